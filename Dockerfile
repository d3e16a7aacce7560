# fedq app image: SuperLink (+ ServerApp), SuperNodes (+ ClientApps) and the run submitter.
#   docker build -t fedq:latest .        (docker compose up --build does this)
# Works for linux/amd64 and linux/arm64 (torch publishes CPU wheels for both).
#
# Two build arguments let the image be built where the internet is not reachable; their
# defaults are what a user with internet access wants:
#   BASE_IMAGE  any Debian-like image with Python 3.11 and its venv module
#               (default python:3.11-slim)
#   PIP_SOURCE  where pip finds the wheels. Default: torch's CPU build from PyTorch's CPU
#               index (PyPI's Linux torch wheel pulls ~3 GB of CUDA libraries), the rest from
#               PyPI. Offline: put every wheel into a folder `wheelhouse/` of the build
#               context and pass PIP_SOURCE="--no-index --find-links /wheels".
# simulations/compose_check.py builds it offline that way (docker build --network none).
ARG BASE_IMAGE=python:3.11-slim

# --- build stage: a virtual environment with the pinned dependencies and fedq. The
# wheels only ever live in this stage, so they never end up in the final image.
FROM ${BASE_IMAGE} AS build
ARG PIP_SOURCE="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fedq/bin:$PATH
RUN python3 -m venv /opt/fedq
# The bracket makes `wheelhouse` optional (a pattern may match nothing while pyproject.toml
# matches); with one, its wheels land in /wheels.
COPY pyproject.toml wheelhous[e] /wheels/

# torch's CPU build in its own layer, so dependency or code changes do not reinstall it.
RUN pip install ${PIP_SOURCE} torch==2.13.0+cpu

# The project's dependencies as pinned in pyproject.toml: the device's (flwr, gymnasium,
# numpy) plus the extras [torch] and [server]; not [sim], whose Ray (~200 MB) only the
# simulation runtime needs.
COPY pyproject.toml README.md .gitignore /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['torch'] + p['optional-dependencies']['server']; print('\n'.join(d for d in deps if not d.startswith('fedq[')))" > /tmp/requirements.txt \
    && pip install ${PIP_SOURCE} -r /tmp/requirements.txt

COPY common /src/common
COPY client /src/client
COPY server /src/server
COPY simulations/*.py /src/simulations/
COPY simulations/scenarios /src/simulations/scenarios
RUN pip install ${PIP_SOURCE} --no-deps /src

# --- final image: the installed venv and the code; no pip cache.
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/fedq/bin:$PATH \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

COPY --from=build /opt/fedq /opt/fedq

# The code, also kept in /app, which `fedq-submit --app /app` packs into the Flower App
# Bundle it submits.
WORKDIR /app
COPY pyproject.toml README.md .gitignore ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations/*.py ./simulations/
COPY simulations/scenarios ./simulations/scenarios

# Unprivileged user; /data holds the volumes (run dirs, device state, SuperLink database)
# and is created here so named volumes start out owned by that user.
RUN useradd --create-home --uid 1000 fedq \
    && mkdir -p /data/runs /data/devices /data/superlink \
    && chown -R fedq:fedq /data
USER fedq

CMD ["fedq-client", "--help"]
