"""Ray Train + DeepSpeed on the GPU: bf16 through torch_autocast, NCCL, ZeRO 0/1/2, checkpoint, resume.

    pytest tests/gpu/test_gpu_training.py    # skipped without CUDA
"""

import pytest
import torch

from harma.config import PlatformConfig
from harma.data.local import eval_arrays
from harma.data.prepare import prepare_dataset
from harma.data.prepared import load_prepared_split
from harma.model.backbone import build_tokenizer
from harma.model.checkpoint import load_checkpoint, trainable_state_dict
from harma.model.harma import build_model
from harma.train.driver import fit
from harma.train.evaluate import evaluate_arrays

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(synth_root, str(out), ["train", "val", "test"])
    return out


# Val mR points the best checkpoint of 2 epochs (16 steps) must gain over the untrained model: on
# this data (6 val images; untrained 64.4) 7 fp32 CPU runs of the same 16 steps on 2 workers reached
# 69.4-73.3 (+5.0 to +8.9; tests/ray/test_train.py); not measured on a GPU yet. One image more at
# I2T R@1 is 2.8 points. A no-op optimizer gains 0.
MIN_VAL_MR_GAIN = 3.0


def _untrained_val_mr(cfg: PlatformConfig) -> float:
    """Val mR of the model as training starts (adapters are the identity then: the frozen backbone)."""
    fp32 = cfg.model.model_copy(update={"backbone": cfg.model.backbone.model_copy(update={"precision": "fp32"})})
    model = build_model(fp32, seed=cfg.run.seed)
    split = load_prepared_split(cfg.data.prepared_uri, cfg.data.val_split)
    images, tokens = eval_arrays(split, model.arch.image_size, build_tokenizer(model.arch.name), cfg.data.max_words)
    return evaluate_arrays(model, images, tokens, split.caption_image)["mr"]


def _cfg(tiny_model_config, prepared, out, name, **overrides) -> PlatformConfig:
    return PlatformConfig(model=tiny_model_config).with_overrides({
        "run.name": name, "run.output_dir": str(out), "data.prepared_uri": str(prepared),
        "model.backbone.precision": "bf16", "train.batch_size": 16, "train.epochs": 1,
        "train.log_every": 2, "train.optimizer.lr": 5e-3, "train.workers.min": 1, "train.workers.max": 1,
        "train.workers.use_gpu": True, "train.workers.cpus_per_worker": 1, **overrides})


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_training_on_the_gpu_checkpoints_and_resumes(ray_cluster, prepared, tmp_path, tiny_model_config,
                                                           zero):
    cfg = _cfg(tiny_model_config, prepared, tmp_path, f"gpu-z{zero}", **{"train.deepspeed.zero_stage": zero})
    first = fit(cfg)  # 140 pairs / 16 = 8 steps
    assert first.device.startswith("cuda") and first.steps == 8 and first.world_size == 1
    assert set(first.test) >= {"i2t_r1", "t2i_r1", "mr"}
    model, saved = load_checkpoint(first.best_checkpoint)  # a GPU run's checkpoint loads on the CPU
    assert saved.model.backbone.precision == "bf16"
    start = trainable_state_dict(build_model(cfg.model, seed=cfg.run.seed))
    trained = trainable_state_dict(model)
    changed = [k for k in start if not torch.equal(start[k].float(), trained[k].float())]
    assert len(changed) > len(start) // 2, f"only {len(changed)} of {len(start)} trainable tensors moved"
    second = fit(cfg.with_overrides({"train.epochs": 2}))  # same run name: resumes at step 8
    assert second.steps == 16 and second.restarts[-1]["resumed_at_step"] == 8
    frozen = _untrained_val_mr(cfg)
    assert second.best_val["mr"] >= frozen + MIN_VAL_MR_GAIN, (
        f"best val mR {second.best_val['mr']:.2f} after 16 steps, untrained {frozen:.2f}")
