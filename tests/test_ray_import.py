"""Ray's import survives a skipped ``sys.path`` entry.

Ray vendors psutil and colorama in ``ray/thirdparty_files``, inserts that directory at
``sys.path[0]`` and imports them at once. Flower's app lookup (``object_ref.validate``)
inserts the app directory at ``sys.path[0]`` and removes it again; if the removal lands
while another thread's import walks ``sys.path``, the walk skips the entry after the
removed one. A CI run on 2 pytest workers once failed with ``No module named 'psutil'``
inside the simulation engine, which such a skip explains (which thread removed the entry
there is not confirmed). The ``sim`` extra therefore installs both packages in site-packages
too. This test replays the skip deterministically, in a fresh interpreter, by hiding
``thirdparty_files`` from the import system."""

import subprocess
import sys

HIDE_RAYS_VENDORED_DIRECTORY = """
import importlib.machinery, sys

class SkipRaysVendoredEntry:
    '''Find every module as usual, but as if the walk over sys.path had skipped
    ray/thirdparty_files (what a concurrent sys.path.remove does to an import).'''

    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is not None:
            return None
        entries = [entry for entry in sys.path if not entry.endswith("thirdparty_files")]
        return importlib.machinery.PathFinder.find_spec(name, entries, target)

sys.meta_path.insert(0, SkipRaysVendoredEntry)
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_ray_imports_when_the_walk_over_sys_path_skips_its_vendored_directory():
    done = _python(HIDE_RAYS_VENDORED_DIRECTORY + "import ray\nimport psutil, colorama\n"
                   "print(psutil.__file__)\nprint(colorama.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    found = done.stdout.split()
    assert found and all("thirdparty_files" not in path for path in found)

