"""What must run before MindSpore starts never imports it: every module of vit_dist.host (found by
listing the package, so a new one is covered too), the model's size table, the CPU backend's thread
settings, the bootstrap and the CLI's parser, each imported in a fresh interpreter where importing
mindspore raises."""
import pkgutil
import subprocess

import pytest

from conftest import PYTHON, ROOT
import vit_dist.host

HOST_MODULES = [f"vit_dist.host.{m.name}" for m in pkgutil.iter_modules(vit_dist.host.__path__)]
BEFORE_MINDSPORE = HOST_MODULES + ["vit_dist.host", "vit_dist.models.spec", "vit_dist.backends.cpu.host",
                                   "vit_dist.bootstrap", "vit_dist.cli"]
BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mindspore" or name.startswith("mindspore."):
            raise ImportError(f"{name} imported before MindSpore may start")
sys.meta_path.insert(0, Blocked())
import importlib
importlib.import_module(sys.argv[1])
assert "mindspore" not in sys.modules
"""


def test_the_host_package_lists_its_modules():
    assert {"config", "placement", "preflight", "datascan", "image_check", "checkpoint_files", "atomic", "errors",
            "planner", "rank_table", "run_record"} <= {m.rsplit(".", 1)[1] for m in HOST_MODULES}


@pytest.mark.parametrize("module", BEFORE_MINDSPORE)
def test_imports_without_mindspore(module):
    result = subprocess.run([PYTHON, "-c", BLOCKER, module], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_blocker_does_block():
    result = subprocess.run([PYTHON, "-c", BLOCKER, "vit_dist.training.loop"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "imported before MindSpore may start" in result.stderr
