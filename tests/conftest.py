import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracle never reaches a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_models() -> Path:
    path = SHARED / "models"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the published Llama 4 configs live in ../shared/models)")
    return path


# The tiny checkpoint most CPU tests share (modules that need another define their own `ckpt`).
@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from models.checkpoint_writer import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=5)


@pytest.fixture(scope="session")
def model(ckpt):
    from models.loading import load_model

    return load_model(ckpt)


@pytest.fixture(scope="session")
def tokenizer(ckpt):
    from models.tokenizer import Tokenizer

    return Tokenizer.from_dir(ckpt)
