"""Loading from folders written by save_pretrained, LoRA, and refusing mismatched teachers."""

import copy

import pytest
import torch

from renio_pl.errors import ConfigError
from renio_pl.models import LoRA, check_same_vocabulary, load_model, load_tokenizer, policy_weights
from tests.conftest import tiny_qwen3
from renio_pl.demo.task import make_tokenizer


def test_load_from_folder_with_dtype(model_dirs):
    model = load_model(str(model_dirs["student"]), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(str(model_dirs["student"])).pad_token == "<pad>"


def test_lora_trains_only_adapters(model_dirs):
    model = load_model(str(model_dirs["student"]), lora=LoRA(r=4, alpha=8))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(ConfigError, match="model.student: model folder ./nowhere does not exist"):
        load_model("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="model.teacher: cannot load 'nobody/no-such-model'.*HF_HUB_OFFLINE=1"):
        load_model("nobody/no-such-model", option="model.teacher")


def test_teacher_with_another_tokenizer_is_refused(model_dirs, tmp_path):
    student, tokenizer = load_model(str(model_dirs["student"])), load_tokenizer(str(model_dirs["student"]))
    other_tokenizer = make_tokenizer("0123456789")
    other = tiny_qwen3(5, len(other_tokenizer))
    with pytest.raises(ConfigError, match="tokenizer differs from the student's"):
        check_same_vocabulary(student, other, tokenizer, other_tokenizer)
    wider = tiny_qwen3(5, len(tokenizer) + 8)
    with pytest.raises(ConfigError, match="output vocabulary has"):
        check_same_vocabulary(student, wider, tokenizer, tokenizer)
    check_same_vocabulary(student, load_model(str(model_dirs["teacher"])), tokenizer, tokenizer)


def test_policy_weights_of_a_lora_student_equal_peft_merge_and_unload(model_dirs):
    """The weights handed to a rollout engine: merged beside the model, under the checkpoint's names."""
    student = load_model(str(model_dirs["student"]), lora=LoRA(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    weights = dict(policy_weights(student))
    reference = copy.deepcopy(student).merge_and_unload().state_dict()
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(weights[n], t) for n, t in load_model(str(model_dirs["student"])).state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student itself untouched


def test_policy_weights_of_a_plain_model_are_its_state_dict(model_dirs):
    model = load_model(str(model_dirs["student"]))
    assert all(t is model.state_dict()[n] or torch.equal(t, model.state_dict()[n]) for n, t in policy_weights(model))
