"""Opt-in regional torch.compile (``models.compile``): the same model, keys and training numbers, and
decoding that stays eager. Dynamo's ``eager`` backend keeps the tests fast; it traces exactly what inductor
would compile, so graph breaks and recompiles show up here."""
import pytest
import torch
from torch._dynamo.utils import counters

from models.blip import load_med_config
from models.blip_pretrain import BLIP_Pretrain
from models.compile import compile_layers
from models.generation import generate
from models.med import MEDLMHeadModel
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

CAPTIONS = ['a dog on a red sofa', 'two people', 'a bicycle leaning on a wall next to a door', 'sky']


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pretrain_losses_and_grads(model):
    torch.manual_seed(5)  # same dropout masks and negatives
    image = torch.randn(4, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(1))
    losses = model(image, CAPTIONS, alpha=0.4)
    sum(losses).backward()
    return [loss.detach() for loss in losses], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_pretraining_keeps_keys_losses_and_gradients():
    kw = dict(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16, queue_size=8)
    torch.manual_seed(0)
    eager = BLIP_Pretrain(**kw)
    compiled = BLIP_Pretrain(**kw)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    # ViT blocks of the model and its momentum twin, layers of the two text encoders and the decoder
    assert compile_layers(compiled, backend='eager') == 2 * 2 + 3 * 2
    assert list(compiled.state_dict()) == keys
    want_losses, want_grads = pretrain_losses_and_grads(eager)
    got_losses, got_grads = pretrain_losses_and_grads(compiled)
    assert counters['stats']['calls_captured'] > 0 and not counters['graph_break']
    for got, want in zip(got_losses, want_losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # instances share compiled graphs: a handful of graphs, not one per layer
    assert counters['stats']['unique_graphs'] < 10


def test_decoding_runs_eagerly_with_compiled_layers():
    """The cache length changes every step; compiled layers would recompile each step. generate() runs them
    eagerly (no frames captured), with the same tokens."""
    torch.manual_seed(0)
    decoder = MEDLMHeadModel(load_med_config(dict(TINY_MED))).eval()
    image = torch.randn(2, 5, TINY_MED['encoder_width'])
    prompt = torch.tensor([[30522, 1037, 3861, 1997]] * 2)
    want = generate(decoder, prompt, image, num_beams=3, max_length=12, min_length=12)
    compile_layers(decoder, backend='eager')
    got = generate(decoder, prompt, image, num_beams=3, max_length=12, min_length=12)
    assert torch.equal(got, want)
    assert counters['stats']['calls_captured'] == 0


def test_compiled_blocks_under_gradient_checkpointing_give_the_same_gradients():
    """ViT-L captioning recomputes its last blocks in backward (vit_grad_ckpt); compiled blocks inside the
    checkpoint give the gradients of the plain model."""
    from models.blip import BLIP_Decoder
    kw = dict(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), vit_grad_ckpt=True,
              vit_ckpt_layer=1)
    torch.manual_seed(0)
    eager, compiled = BLIP_Decoder(**kw), BLIP_Decoder(**kw)
    compiled.load_state_dict(eager.state_dict())
    compile_layers(compiled, backend='eager')
    image = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (eager, compiled):
        torch.manual_seed(5)
        model(image, CAPTIONS[:2]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters['stats']['calls_captured'] > 0 and not counters['graph_break']
