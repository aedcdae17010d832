"""Where the tests' data lies: in the repository (tests/data/, and the product's own package
data), never outside it. Missing data makes the test that needs it fail, not skip."""

from pathlib import Path

from raymoe.deploy.k8s.render import DEFAULT_CRDS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
QWEN_LOADS = DATA / "qwen3-30b-a3b-loads" / "expert_loads.npy"  # int64 [48, 128], see tests/data/README.md
EPLB_EXAMPLE = DATA / "eplb" / "eplb_example.json"
CRDS = DEFAULT_CRDS  # the KubeRay CRDs `raymoe k8s check` reads from the installed package
