"""RecLoRA on the tiny model: a user's materialised PEFT adapter computes what the bank-and-gate model
computes for that user; the saved bank, read back by the gateway's MetaBank, writes the same adapter."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from adapters.reclora import BankSettings, load_reclora, materialize
from adapters.train import answer_logits, load_model
from service.personalize import MetaBank

ROWS = [[1, 5, 9, 13, 17, 21], [1, 7, 11], [1, 30, 31, 32, 33]]
USER_DIM = 6


def trained_like_bank(model_dir):
    model = load_reclora(model_dir, settings=BankSettings(n_meta=4, rank=4, alpha=8), user_dim=USER_DIM,
                         dtype=torch.float32)
    torch.manual_seed(0)
    for layer in model.layers.values():  # B starts at zero; give the bank something to mix
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        torch.nn.init.normal_(layer.gate.net[3].weight, std=1.0)
    return model.eval()


@torch.inference_mode()
def test_materialized_adapter_equals_reclora_for_that_user(tiny_model, tmp_path):
    model = trained_like_bank(tiny_model)
    users = torch.randn(2, USER_DIM, generator=torch.Generator().manual_seed(1))
    outputs = []
    for i, user in enumerate(users):
        model.set_users(user.unsqueeze(0).expand(len(ROWS), -1))
        expected = answer_logits(model, ROWS, pad_id=0)
        path = materialize(model, user, tmp_path / f"p-{i}", str(tiny_model))
        peft = load_model(tiny_model, adapter_dir=path, dtype=torch.float32).eval()
        torch.testing.assert_close(answer_logits(peft, ROWS, pad_id=0), expected, atol=0.03, rtol=0.01)
        outputs.append(expected)
    model.set_users(None)
    base = answer_logits(model, ROWS, pad_id=0)
    assert (outputs[0] - base).abs().max() > 0.05, "the bank does not change the model"
    assert (outputs[0] - outputs[1]).abs().max() > 0.01, "two users got the same adapter"


def test_saved_bank_writes_the_same_adapter_in_the_gateway(tiny_model, tmp_path):
    model = trained_like_bank(tiny_model)
    model.save(tmp_path / "bank", {"base_model": str(tiny_model)})
    bank = MetaBank(tmp_path / "bank")
    assert set(bank.modules) == set(model.layers)
    user = torch.randn(USER_DIM)
    offline = load_file(str(materialize(model, user, tmp_path / "offline", str(tiny_model)) /
                            "adapter_model.safetensors"))
    served = load_file(str(bank.write(bank.alphas(user), tmp_path / "served") / "adapter_model.safetensors"))
    assert offline.keys() == served.keys()
    for key in offline:
        torch.testing.assert_close(served[key], offline[key])
