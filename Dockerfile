# fedq app image: SuperLink (+ ServerApp), SuperNodes (+ ClientApps) and the run submitter.
#   docker build -t fedq:latest .        (docker compose up --build does this)
# Works for linux/amd64 and linux/arm64 (torch publishes CPU wheels for both).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

WORKDIR /app

# The CPU build of torch, from PyTorch's CPU index: PyPI's linux/amd64 torch wheel pulls
# ~3 GB of CUDA libraries. Its own layer, so code changes do not reinstall it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu

# The project's dependencies as pinned in pyproject.toml: the device's (flwr, gymnasium,
# numpy) plus the extras [torch] and [server]; not [sim], whose Ray (~200 MB) only the
# simulation runtime needs.
COPY pyproject.toml README.md .gitignore ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['torch'] + p['optional-dependencies']['server']; print('\n'.join(d for d in deps if not d.startswith('fedq[')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# The code: installed (console scripts fedq-client, fedq-submit, fedq-certs, ...) and kept
# in /app, which `fedq-submit --app /app` packs into the Flower App Bundle it submits.
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations/*.py ./simulations/
COPY simulations/scenarios ./simulations/scenarios
RUN pip install --no-deps . && rm -rf build *.egg-info

# Unprivileged user; /data holds the volumes (run dirs, device state, SuperLink database)
# and is created here so named volumes start out owned by that user.
RUN useradd --create-home --uid 1000 fedq \
    && mkdir -p /data/runs /data/devices /data/superlink \
    && chown -R fedq:fedq /data
USER fedq

CMD ["fedq-client", "--help"]
