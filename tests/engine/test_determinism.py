"""``training.deterministic``: the same short Mask R-CNN run in two fresh processes gives
bit-identical weights (SHA-256 over the state_dict), whatever the hash seed and the number
of data-loader workers; and the pieces behind it (settings restored, worker seeding,
the fingerprint)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from instseg_pipeline.engine.rng import reproducible, state_dict_sha256
from instseg_pipeline.torchdata.dataset import seed_worker

TESTS_DIR = Path(__file__).resolve().parent
MARKER = "DETERMINISM_RESULT "
# a small synthetic source and the tiny model: a few seconds of training per process
SOURCE = {"type": "synthetic",
          "synthetic": {"num_images": 12, "min_size": 96, "max_size": 128}}
TRAINING = {"max_iters": 12, "batch_size": 2, "warmup_iters": 3, "log_every": 0,
            "checkpoint_every": 0, "val_max_images": 2, "progress_bar": False,
            "device": "cpu", "deterministic": True,
            "selection": {"every_epochs": 0}, "scheduler": {"name": "constant"},
            "augmentation": {"preset": "light"},
            "model": {"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128}}


def child(data_root: str, checkpoint_dir: str, overrides: str) -> None:
    """Subprocess body: ingest the synthetic source, train, print the weights' SHA-256."""
    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.fit import fit
    from instseg_pipeline.pipelines.ingestion.nodes import ingest_source, split_images

    images, instances, categories, _, _ = ingest_source({**SOURCE, "root": data_root})
    images = split_images(images, {"val_fraction": 0.25, "split_seed": 0})
    params = {**TRAINING, **json.loads(overrides), "checkpoint_dir": checkpoint_dir}
    out = fit(images, instances, categories, data_root, TrainingConfig.from_params(params))
    print(MARKER + json.dumps({"sha256": state_dict_sha256(out["model"]["state_dict"]),
                               "losses": out["history"]["loss"].tolist(),
                               "threads": torch.get_num_threads()}))


def train_in_fresh_process(tmp_path: Path, data_root: Path, name: str, hash_seed: str,
                           **overrides) -> dict:
    """Run `child` in a new interpreter with PYTHONHASHSEED=``hash_seed``; its result."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_determinism; "
            f"test_determinism.child({str(data_root)!r}, {str(tmp_path / name)!r}, "
            f"{json.dumps(overrides)!r})")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"no result line in the output of run {name}: {proc.stdout[-2000:]}"
    return json.loads(lines[-1][len(MARKER):])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The synthetic source generated once, so every process reads the same files."""
    from instseg_pipeline.data.sources import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, SOURCE["synthetic"])
    return root


@pytest.mark.slow
def test_two_fresh_processes_train_bit_identical_weights(tmp_path, data_root):
    first = train_in_fresh_process(tmp_path, data_root, "first", hash_seed="0")
    second = train_in_fresh_process(tmp_path, data_root, "second", hash_seed="4242")
    assert len(first["losses"]) == TRAINING["max_iters"]
    assert all(np.isfinite(first["losses"])) and first["losses"][0] != first["losses"][-1]
    assert second["losses"] == first["losses"]
    assert second["sha256"] == first["sha256"]
    # data-loader workers draw no differently: augmentation is a function of (seed, epoch,
    # sample), the workers' seeds come from the loader's own generator
    workers = train_in_fresh_process(tmp_path, data_root, "workers", hash_seed="7",
                                     num_workers=2)
    assert workers["losses"] == first["losses"]
    assert workers["sha256"] == first["sha256"]


# ------------------------------------------------------------------------------ the pieces

def test_reproducible_sets_deterministic_kernels_and_threads_then_restores_them():
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with reproducible(True, threads=1) as used:
        assert used == 1 and torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # CPU: strict
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic
    with reproducible(False) as used:  # the process's count, algorithms untouched
        assert used == threads and not torch.are_deterministic_algorithms_enabled()


def test_reproducible_restores_settings_when_the_block_fails():
    with pytest.raises(KeyError), reproducible(True, threads=1):
        raise KeyError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


def test_reproducible_on_cuda_warns_instead_of_failing_and_fixes_the_cublas_workspace(
        monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with reproducible(True, device_type="cuda"):
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_state_dict_sha256_sees_every_bit_but_not_the_key_order():
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor(7)}
    digest = state_dict_sha256(state)
    assert digest == state_dict_sha256(dict(reversed(list(state.items()))))
    flipped = state["b"].clone()
    flipped.view(torch.int32)[0, 1] ^= 1  # the lowest mantissa bit of one value
    assert state_dict_sha256({**state, "b": flipped}) != digest
    assert state_dict_sha256({**state, "b": state["b"].reshape(3, 2)}) != digest
    assert state_dict_sha256({**state, "a": torch.tensor(7.0)}) != digest


def test_seed_worker_seeds_python_and_numpy_from_the_worker_torch_seed():
    def draws(torch_seed: int, worker_id: int) -> tuple:
        torch.manual_seed(torch_seed)
        seed_worker(worker_id)
        return random.random(), float(np.random.random())

    assert draws(11, 0) == draws(11, 0)
    assert draws(11, 0) != draws(12, 0)
    assert draws(12, 1) != draws(12, 0)


def test_a_built_augmentation_draws_from_a_fixed_seed_not_from_entropy():
    """Two Composes built from the same config apply the same first draw (albumentations
    would otherwise seed each transform from OS entropy)."""
    from instseg_pipeline.config_schema import build
    from instseg_pipeline.engine.config import AugmentationConfig
    from instseg_pipeline.torchdata.augment import build_augmentation

    config = build(AugmentationConfig, {"transforms": [
        {"name": "Affine", "rotate": [-30, 30], "scale": [0.7, 1.3], "p": 1.0}]},
        "training.augmentation")
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    first, second = (build_augmentation(config)(image=image, bboxes=np.zeros((0, 4)),
                                                labels=[], instance_index=[])["image"]
                     for _ in range(2))
    assert np.array_equal(first, second)
