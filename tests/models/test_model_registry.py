"""The registry: a family added in one line is built, saved and reloaded by name; unknown
names and keys are refused with the dotted parameter name."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from instseg_pipeline.models import (
    ModelFamily,
    OnnxSpec,
    build_model,
    check_eval_output,
    check_losses,
    family_of,
    family_params,
    load_model,
    model_config,
    registry,
)


class WholeImage(nn.Module):
    """A fake family's network: one detection per image covering all of it.

    Its single parameter ``logit`` sets the score and every mask pixel (sigmoid).
    """

    def __init__(self, bias: float):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if self.training:
            brightness = torch.stack([image.mean() for image in images]).mean()
            return {"loss_fit": (torch.sigmoid(self.logit) - brightness) ** 2}
        probability = torch.sigmoid(self.logit)
        return [{"boxes": torch.tensor([[0.0, 0.0, image.shape[2], image.shape[1]]]),
                 "labels": torch.ones(1, dtype=torch.int64), "scores": probability[None],
                 "masks": probability.expand(1, 1, *image.shape[1:]).clone()}
                for image in images]


FAKE = ModelFamily(
    name="whole_image", build=lambda params, num_classes: WholeImage(params.get("bias", 0.0)),
    keys=("bias",), loss_names=("loss_fit",), onnx=OnnxSpec(False, "a test family"),
    postprocess_cuts=lambda network: {"score_threshold": 0.0, "detections_per_img": 1})


@pytest.fixture
def fake_registered(monkeypatch):
    """FAKE in a copy of the registry, so that no other test sees it."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    return registry.register(FAKE)


def test_a_registered_family_is_built_saved_and_reloaded_by_name(fake_registered):
    model = build_model({"name": "whole_image", "bias": 0.5, "weights": None}, num_classes=3)
    assert isinstance(model, WholeImage) and family_of(model) is FAKE
    check_losses(model([torch.rand(3, 8, 9)], [{}]), FAKE.loss_names)
    config = json.loads(json.dumps(model_config({"name": "whole_image", "bias": 0.5}, 3)))
    assert config == {"name": "whole_image", "bias": 0.5, "num_classes": 3}
    with torch.no_grad():
        model.logit.fill_(1.5)
    rebuilt = load_model(config, model.state_dict()).eval()
    (output,) = rebuilt([torch.rand(3, 8, 9)])
    check_eval_output(output, 8, 9)
    assert output["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(1.5)).item())


def test_a_registered_family_refuses_keys_it_does_not_declare(fake_registered):
    with pytest.raises(ValueError, match=r"training\.model\.min_size for whole_image; "
                                         r"known: bias, name, weights$"):
        build_model({"name": "whole_image", "min_size": 64}, 3)


def test_a_taken_name_cannot_be_registered_again(fake_registered):
    with pytest.raises(ValueError, match="'whole_image' is already registered"):
        registry.register(FAKE)


def test_unknown_name_and_unknown_key_name_the_parameter():
    with pytest.raises(ValueError, match=r"unknown model name 'maskrcnn_r101' "
                                         r"\(training\.model\.name\); use one of \[.*"
                                         r"'maskrcnn_tiny'.*\]"):
        build_model({"name": "maskrcnn_r101"}, 3)
    with pytest.raises(ValueError) as error:
        model_config({"name": "maskrcnn_tiny", "rpn_pre_nms_topn_train": 10, "lr": 1}, 3)
    message = str(error.value)
    assert message.startswith("unknown model parameter training.model.rpn_pre_nms_topn_train, "
                              "training.model.lr for maskrcnn_tiny; known: ")
    assert "rpn_pre_nms_top_n_train" in message and "roi_batch_size_per_image" in message


def test_family_params_put_the_model_block_over_the_family_block():
    """training.families.<section> holds a family's settings; training.model overrides."""
    families = {"maskrcnn": {"box_detections_per_img": 50, "rpn_batch_size_per_image": 64}}
    params = family_params({"name": "maskrcnn_tiny", "min_size": 96, "weights": None,
                            "box_detections_per_img": 7}, families)
    assert params == {"name": "maskrcnn_tiny", "min_size": 96, "box_detections_per_img": 7,
                      "rpn_batch_size_per_image": 64}
    assert build_model(params, 3).roi_heads.detections_per_img == 7


def test_family_params_name_a_bad_block_key_by_its_dotted_path():
    with pytest.raises(ValueError, match=r"^unknown model parameter "
                                         r"training\.families\.maskrcnn\.rpn_topn for "
                                         r"maskrcnn_tiny; known: "):
        family_params({"name": "maskrcnn_tiny"}, {"maskrcnn": {"rpn_topn": 3}})
    with pytest.raises(ValueError, match=r"^unknown model family block "
                                         r"training\.families\.maskrnn; known: .*maskrcnn"):
        family_params({"name": "maskrcnn_tiny"}, {"maskrnn": {}})


def test_family_of_needs_a_network_from_build_model():
    model = build_model({"name": "maskrcnn_tiny"}, 3)
    assert family_of(model).name == "maskrcnn_tiny"
    with pytest.raises(ValueError, match="WholeImage was not made by models.build_model"):
        family_of(WholeImage(0.0))


def test_family_of_sees_through_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(build_model({"name": "maskrcnn_tiny"}, 3))
        assert family_of(wrapped).name == "maskrcnn_tiny"
    finally:
        dist.destroy_process_group()


def test_a_family_must_say_why_it_is_not_exportable_and_keep_common_keys_out():
    with pytest.raises(ValueError, match="how the family is traced or why it cannot be"):
        OnnxSpec(False, "")
    with pytest.raises(ValueError, match=r"keys \['weights'\] are common to every family"):
        ModelFamily(name="x", build=WholeImage, keys=("weights",), loss_names=(),
                    onnx=OnnxSpec(False, "no"), postprocess_cuts=dict)


def test_export_refuses_a_family_that_says_it_cannot_be_exported(fake_registered, tmp_path):
    from instseg_pipeline.export.onnx import ExportError, export_onnx

    network = build_model({"name": "whole_image", "bias": 2.0}, num_classes=2).eval()
    with pytest.raises(ExportError, match="whole_image cannot be exported to ONNX: a test "
                                          "family; serve it with the torch backend"):
        export_onnx(network, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
