"""The demo notebook runs top to bottom (nbclient), at a smaller workload than the README's demo.

The notebook reads its workload from environment variables (MFJAX_DEMO_EVENTS, MFJAX_DEMO_AGENTS,
MFJAX_DEMO_MAX_NEW_TOKENS, MFJAX_DEMO_MF_TOKENS, MFJAX_DEMO_OUT); here: 1 event,
32 agents (one warm-up and one rollout step), short generations. The simulation's one-time compile
dominates (1.5–2 minutes on 2 cores); the per-cell timeout leaves room for a loaded machine.
"""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "mfjax_demo.ipynb")


def test_demo_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("jieba")
    from mfjax.io import smollm2

    try:
        smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalled as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")
    out = tmp_path / "demo"
    for key, value in {"MFJAX_DEMO_EVENTS": "1", "MFJAX_DEMO_AGENTS": "32", "MFJAX_DEMO_MAX_NEW_TOKENS": "6",
                       "MFJAX_DEMO_MF_TOKENS": "12", "MFJAX_DEMO_OUT": str(out)}.items():
        monkeypatch.setenv(key, value)
    # conftest gives this process 8 fake CPU devices (for the sharding tests); the notebook's simulation
    # would then pad its one world to eight. It runs on the machine's real devices.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    monkeypatch.setenv("XLA_FLAGS", flags)
    # The kernel imports this checkout's mfjax, whatever else is installed.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"mfjax from {ROOT}" in text
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["counts"]["events"] == 1 and metrics["coverage"]["labelled"] == metrics["coverage"]["comments"]
    assert metrics["figures"] and all((out / "eval" / f).is_file() for f in metrics["figures"])
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(metrics["figures"])
