"""The dalle network: a causal GPT over caption tokens then image tokens, its losses and its saved tokenizer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlas.config import resolve_config
from dlas.context import Context
from dlas.errors import ConfigError
from dlas.models.transformer.dalle import DalleTransformer
from dlas.trainer.trainer import ExtensibleTrainer, enable_checkpointing
from dlas.weights import load_network_weights, save_network_weights

TINY = {"text_length": 6, "image_vocab_size": 16, "image_grid": [3, 4], "width": 32, "depth": 2, "heads": 2,
        "text_vocab_size": 260}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**options) -> DalleTransformer:
    torch.manual_seed(0)
    return DalleTransformer(**{**TINY, **options}).eval()


def random_ids(net: DalleTransformer, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 258, (batch, net.text_length), generator=g)
    image = torch.randint(0, net.image_vocab_size, (batch, net.image_length), generator=g)
    return text, image


def all_logits(net, text, image) -> torch.Tensor:
    """Per-position logits over both vocabularies side by side: [B, L + N, Vt + Vi] (-inf where not predicted)."""
    text_logits, image_logits = net.logits(text, image)
    pad_text = F.pad(text_logits, (0, net.image_vocab_size), value=0.0)
    pad_image = F.pad(image_logits, (net.text_vocab_size, 0), value=0.0)
    return torch.cat([pad_text, pad_image], dim=1)


@pytest.mark.parametrize("changed", [0, 3, 6, 9, 17])  # text tokens 0..5, image tokens 6..17
def test_changing_a_token_changes_no_earlier_prediction(changed):
    net = tiny()
    text, image = random_ids(net)
    before = all_logits(net, text, image)
    sequence = torch.cat([text, image], dim=1)
    vocab = net.text_vocab_size if changed < net.text_length else net.image_vocab_size
    sequence[:, changed] = (sequence[:, changed] + 5) % vocab
    after = all_logits(net, sequence[:, :net.text_length], sequence[:, net.text_length:])
    # position p predicts token p from tokens < p: predictions up to the changed token's own stay as they were
    assert torch.equal(before[:, :changed + 1], after[:, :changed + 1])
    if changed + 1 < sequence.shape[1]:
        assert not torch.allclose(before[:, changed + 1:], after[:, changed + 1:])


def test_losses_are_the_cross_entropies_of_the_caption_without_padding_and_of_the_image():
    net = tiny(caption_drop=0.0)
    _, image = random_ids(net)
    captions = ["ab", "abcd"]
    losses = net(captions, image.view(2, 3, 4))
    text = net.text_tokens(captions)
    text_logits, image_logits = net.logits(text, image)
    # by hand: caption tokens and <eot> count, the padding after it does not
    terms = [-text_logits[b, p].log_softmax(-1)[text[b, p]] for b in range(2) for p in range(net.text_length)
             if text[b, p] != 0]
    assert len(terms) == (2 + 1) + (4 + 1)
    assert torch.allclose(losses["text_loss"], torch.stack(terms).mean())
    assert torch.allclose(losses["image_loss"], F.cross_entropy(image_logits.flatten(0, 1), image.flatten()))


def test_an_untrained_network_predicts_about_uniformly():
    net = tiny()
    with torch.no_grad():
        losses = net(["a caption"], random_ids(net, 1)[1])
    assert abs(float(losses["image_loss"]) - math.log(16)) < 0.1
    assert abs(float(losses["text_loss"]) - math.log(260)) < 0.1


def dalle_config(text_weight=1 / 8, image_weight=7 / 8) -> dict:
    return {
        "name": "dalle",
        "networks": {"dalle": {"type": "dalle", **TINY, "caption_drop": 0.0}},
        "steps": {"dalle": {
            "training": ["dalle"],
            "optimizer": {"type": "adamw", "lr": 1e-3},
            "injectors": {"forward": {"type": "generator", "network": "dalle",
                                      "in": {"text": "caption", "image_tokens": "image_tokens"},
                                      "out": {"text_loss": "text_loss", "image_loss": "image_loss"}}},
            "losses": {"text": {"type": "direct", "key": "text_loss", "weight": text_weight},
                       "image": {"type": "direct", "key": "image_loss", "weight": image_weight}}}},
        "train": {"niter": 1},
    }


def test_a_step_weights_text_and_image_one_to_seven_as_dalle_did():
    torch.manual_seed(0)
    trainer = ExtensibleTrainer(resolve_config(dalle_config(), training=False), torch.device("cpu"))
    net = trainer.networks["dalle"]
    _, image = random_ids(net)
    state = {"caption": ["a red circle", "a blue square"], "image_tokens": image}
    ctx = Context(networks=trainer.networks, iteration=1)
    step = trainer.steps[0]
    step.run_injectors(state, ctx)
    total, logged = step.compute_losses(state, ctx)
    text_logits, image_logits = net.logits(net.text_tokens(state["caption"]), image)
    text = net.text_tokens(state["caption"])
    hand_text = F.cross_entropy(text_logits.flatten(0, 1), text.flatten(), ignore_index=0)
    hand_image = F.cross_entropy(image_logits.flatten(0, 1), image.flatten())
    assert torch.allclose(total, (hand_text + 7 * hand_image) / 8)
    assert torch.allclose(logged["text"], hand_text) and torch.allclose(logged["image"], hand_image)


def test_caption_drop_trains_on_the_empty_caption_and_never_in_eval_mode():
    net = tiny(caption_drop=0.999)
    _, image = random_ids(net)
    empty = net(["", ""], image)
    net.train()
    torch.manual_seed(3)
    dropped = net(["a red circle", "a blue square"], image)
    assert torch.allclose(dropped["image_loss"], empty["image_loss"])
    net.eval()
    kept = net(["a red circle", "a blue square"], image)
    assert not torch.allclose(kept["image_loss"], empty["image_loss"])


def test_activation_checkpointing_gives_the_same_gradients():
    plain, checkpointed = tiny().train(), tiny().train()
    assert enable_checkpointing(checkpointed, "dalle") == TINY["depth"]
    _, image = random_ids(plain)
    for net in (plain, checkpointed):
        torch.manual_seed(0)
        losses = net(["a red circle", "x"], image)
        (losses["text_loss"] + losses["image_loss"]).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_tied_embeddings_share_the_head_and_the_embedding():
    net = tiny(tie_embeddings=True)
    assert net.image_head.weight is net.image_embedding.weight
    assert net.text_head.weight is net.text_embedding.weight
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in tiny().parameters())


def test_the_weights_carry_the_tokenizer(tmp_path):
    from dlas.data.tokenizer import train_caption_tokenizer

    captions = ["a small red circle", "a large blue square", "a small green triangle"] * 4
    train_caption_tokenizer(captions, vocab_size=300).save(tmp_path / "tokenizer.json")
    trained = tiny(tokenizer=str(tmp_path / "tokenizer.json"), text_vocab_size=300)
    save_network_weights(trained, tmp_path / "dalle.safetensors")
    (tmp_path / "tokenizer.json").unlink()  # the run folder is moved, the tokenizer file is gone
    restored = tiny(tokenizer=str(tmp_path / "tokenizer.json"), text_vocab_size=300)
    load_network_weights(restored, tmp_path / "dalle.safetensors")
    assert torch.equal(restored.text_tokens(captions), trained.text_tokens(captions))
    assert not torch.equal(tiny().text_tokens(captions), trained.text_tokens(captions))  # bytes differ


def test_a_missing_tokenizer_is_an_error_once_captions_need_it(tmp_path):
    net = tiny(tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="train_tokenizer.py"):
        net(["a caption"], random_ids(net, 1)[1])


def test_a_tokenizer_larger_than_the_text_vocabulary_is_a_config_error():
    with pytest.raises(ConfigError, match="text_vocab_size"):
        tiny(text_vocab_size=100)  # the byte tokenizer has 258 ids


def test_image_tokens_of_another_grid_are_a_config_error_naming_image_grid():
    net = tiny()
    with pytest.raises(ConfigError) as error:
        net(["x"], torch.zeros(1, 4, 4, dtype=torch.long))
    assert error.value.problems[0].path == "image_grid"


def test_image_tokens_beyond_the_codebook_are_a_config_error_naming_image_vocab_size():
    net = tiny()
    with pytest.raises(ConfigError) as error:
        net(["x"], torch.full((1, 12), 16))
    assert error.value.problems[0].path == "image_vocab_size"


def test_debug_info_reports_the_unigram_entropy_of_the_image_tokens():
    net = tiny()
    image = torch.tensor([[0] * 6 + [1] * 6])  # two codes, equally often: ln 2 nats
    net(["x"], image)
    info = net.debug_info()
    assert torch.allclose(torch.as_tensor(info["image_unigram_entropy"]), torch.tensor(math.log(2)))
    assert info["image_token_usage"].shape == (16,) and info["image_token_usage"][:2].tolist() == [6, 6]
