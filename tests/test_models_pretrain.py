"""BLIP_Pretrain: gradients, momentum EMA, shared modules, fp32 losses under bf16, pretrained init,
and loading a pretrain-layout checkpoint into every downstream model with the exact gaps."""
import pytest
import torch

from models.blip import BLIP_Base, BLIP_Decoder
from models.blip_itm import BLIP_ITM, blip_itm
from models.blip_pretrain import BLIP_Pretrain, TextBatch, TokenizingCollate, init_from_pretrained
from models.blip_retrieval import BLIP_Retrieval, blip_retrieval
from models.checkpoint import CheckpointError, load_checkpoint
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

CAPTIONS = ['a dog on a red sofa', 'two people', 'a bicycle leaning on a wall next to a door', 'sky']
KW = dict(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))


def tiny_pretrain(seed=0, **kwargs) -> BLIP_Pretrain:
    torch.manual_seed(seed)
    return BLIP_Pretrain(**KW, **{'embed_dim': 16, 'queue_size': 8, **kwargs})


def images(B, seed=1):
    return torch.randn(B, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(seed))


def test_every_trainable_parameter_gets_a_gradient_and_momentum_follows_the_ema():
    model = tiny_pretrain()
    twins = [p_m for _, m in model.model_pairs for p_m in m.parameters()]
    online = [p for o, _ in model.model_pairs for p in o.parameters()]
    with torch.no_grad():  # make online != momentum so the EMA is visible
        for p in online:
            p.add_(0.01)
    expected = [0.995 * p_m + 0.005 * p for p, p_m in zip(online, twins)]
    losses = model(images(4), CAPTIONS, alpha=0.4)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(not p.requires_grad and p.grad is None for p in twins)
    for p_m, e in zip(twins, expected):
        torch.testing.assert_close(p_m, e, rtol=0, atol=1e-7)
    assert model.queue_ptr.item() == 4


def test_captions_tokenised_in_loader_workers_give_the_losses_of_caption_strings():
    # pretrain.py tokenises in its DataLoader workers (TokenizingCollate); a forked worker must produce the
    # ids the model would, and forward on them must be the forward on the strings
    model = tiny_pretrain()
    samples = [(img, cap) for img, cap in zip(images(4), CAPTIONS)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=1,
                                         collate_fn=TokenizingCollate(model.tokenizer))
    image, caption, text = next(iter(loader))
    assert isinstance(text, TextBatch) and list(caption) == CAPTIONS and text.input_ids.shape == (4, 30)
    expected = model.tokenize(CAPTIONS)
    assert torch.equal(text.input_ids, expected.input_ids) and torch.equal(text.attention_mask, expected.attention_mask)
    torch.manual_seed(5)
    from_strings = model(image, CAPTIONS, alpha=0.4)
    twin = tiny_pretrain()  # forward moves the momentum encoders and the queues: a fresh copy for the second
    torch.manual_seed(5)
    from_tokens = twin(image, text, alpha=0.4)
    for a, b in zip(from_strings, from_tokens):
        assert torch.equal(a, b)


def test_encoder_and_decoder_share_everything_but_self_attention():
    model = tiny_pretrain()
    enc, dec = model.text_encoder, model.text_decoder.bert
    ptr = lambda t: t.data_ptr()  # noqa: E731
    assert ptr(enc.embeddings.word_embeddings.weight) == ptr(dec.embeddings.word_embeddings.weight)
    assert ptr(model.text_decoder.cls.predictions.decoder.weight) == ptr(dec.embeddings.word_embeddings.weight)
    for e, d in zip(enc.encoder.layer, dec.encoder.layer):
        assert e.crossattention is d.crossattention and e.intermediate is d.intermediate and e.output is d.output
        assert ptr(e.crossattention.self.kv.weight) == ptr(d.crossattention.self.kv.weight)
        assert ptr(e.output.dense.weight) == ptr(d.output.dense.weight)
        assert ptr(e.attention.self.qkv.weight) != ptr(d.attention.self.qkv.weight)
    assert model.text_encoder_m.embeddings is not enc.embeddings
    assert enc.embeddings.word_embeddings.num_embeddings == 30524 == model.text_encoder_m.config.vocab_size


def test_losses_stay_fp32_under_bf16_autocast():
    model = tiny_pretrain()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(images(2), CAPTIONS[:2], alpha=0.4)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)


def test_a_local_batch_of_one_does_not_crash_itm_sampling():
    # one sample: its only candidate is itself (weight 0); the original's multinomial raised here
    model = tiny_pretrain()
    losses = model(images(1), CAPTIONS[:1], alpha=0.4)
    assert all(torch.isfinite(loss) for loss in losses)


# ------------------------------------------------------------------------------------------ pretrained init

def test_init_from_pretrained_maps_bert_and_vit_and_copies_momentum(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(3)
    bert = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / 'bert')
    vit_model = tiny_pretrain(seed=5).visual_encoder
    vit_sd = {**vit_model.state_dict(), 'head.weight': torch.zeros(10, 32), 'head.bias': torch.zeros(10)}
    torch.save({'model': vit_sd}, tmp_path / 'vit.pth')

    model = tiny_pretrain()
    cross_before = model.text_encoder.encoder.layer[1].crossattention.self.kv.weight.clone()
    init_from_pretrained(model, vit_source=str(tmp_path / 'vit.pth'), bert_source=str(tmp_path / 'bert'))
    b = bert.state_dict()
    enc, dec = model.text_encoder, model.text_decoder
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight, vit_sd['blocks.1.attn.qkv.weight'])
    assert torch.equal(enc.embeddings.word_embeddings.weight[:30522], b['bert.embeddings.word_embeddings.weight'])
    for i in range(2):
        q = b[f'bert.encoder.layer.{i}.attention.self.query.weight']
        assert torch.equal(enc.encoder.layer[i].attention.self.state_dict()['query.weight'], q)  # both self-attentions
        assert torch.equal(dec.bert.encoder.layer[i].attention.self.state_dict()['query.weight'], q)
        assert torch.equal(enc.encoder.layer[i].output.dense.weight, b[f'bert.encoder.layer.{i}.output.dense.weight'])
    assert torch.equal(enc.encoder.layer[1].crossattention.self.kv.weight, cross_before)  # stays random
    pred = dec.cls.predictions
    assert torch.equal(pred.transform.dense.weight, b['cls.predictions.transform.dense.weight'])
    assert torch.equal(pred.bias[:30522], b['cls.predictions.bias']) and pred.bias[30522:].abs().sum() == 0
    for online, twin in model.model_pairs:
        assert all(torch.equal(p, p_m) for p, p_m in zip(online.parameters(), twin.parameters()))


def test_unreachable_sources_raise_errors_naming_them():
    model = tiny_pretrain()
    with pytest.raises(CheckpointError, match='no-such-org/no-such-bert'):
        init_from_pretrained(model, bert_source='no-such-org/no-such-bert')
    with pytest.raises(CheckpointError, match='vit_no_such_model_patch16'):
        init_from_pretrained(model, vit_source='vit_no_such_model_patch16')


# ------------------------------------------------------------------------------------------ checkpoint layout

@pytest.fixture(scope='module')
def pretrain_checkpoint(module_dir):
    model = tiny_pretrain(seed=7)
    path = module_dir('ckpt') / 'pretrain.pth'
    torch.save({'model': model.state_dict(), 'epoch': 0}, path)
    return path, model.state_dict()


def prefixed(state: dict, *prefixes) -> set:
    return {k for k in state if k.startswith(prefixes)}


def test_pretrain_checkpoint_loads_into_every_downstream_model(pretrain_checkpoint):
    path, sd = pretrain_checkpoint
    decoder_keys = prefixed(sd, 'text_decoder.')
    momentum_keys = prefixed(sd, 'visual_encoder_m.', 'vision_proj_m.', 'text_encoder_m.', 'text_proj_m.')

    retrieval, msg = load_checkpoint(BLIP_Retrieval(**KW, embed_dim=16, queue_size=8), str(path))
    assert set(msg.missing_keys) == {'idx_queue', 'ptr_queue'}          # not in a pretrain checkpoint
    assert set(msg.unexpected_keys) == decoder_keys | {'queue_ptr'}
    assert torch.equal(retrieval.image_queue, sd['image_queue'])
    assert torch.equal(retrieval.text_encoder_m.encoder.layer[0].attention.self.state_dict()['key.weight'],
                       sd['text_encoder_m.encoder.layer.0.attention.self.key.weight'])

    other_size, msg = load_checkpoint(BLIP_Retrieval(**KW, embed_dim=16, queue_size=16), str(path))
    assert set(msg.missing_keys) == {'image_queue', 'text_queue', 'idx_queue', 'ptr_queue'}  # dropped: 8 != 16
    assert set(msg.unexpected_keys) == decoder_keys

    itm, msg = load_checkpoint(BLIP_ITM(**KW, embed_dim=16), str(path))
    assert msg.missing_keys == []
    assert set(msg.unexpected_keys) == decoder_keys | momentum_keys | {'temp', 'image_queue', 'text_queue',
                                                                       'queue_ptr'}
    decoder, msg = load_checkpoint(BLIP_Decoder(**KW), str(path))
    assert msg.missing_keys == []
    assert set(msg.unexpected_keys) == set(sd) - prefixed(sd, 'visual_encoder.', 'text_decoder.')
    assert torch.equal(decoder.text_decoder.bert.encoder.layer[1].crossattention.self.state_dict()['value.weight'],
                       sd['text_decoder.bert.encoder.layer.1.crossattention.self.value.weight'])
    base, msg = load_checkpoint(BLIP_Base(**KW), str(path))
    assert msg.missing_keys == []
    assert set(msg.unexpected_keys) == set(sd) - prefixed(sd, 'visual_encoder.', 'text_encoder.')
    # factories: ITM asserts nothing is missing; retrieval accepts exactly the queue gap
    blip_itm(str(path), **KW, embed_dim=16)
    blip_retrieval(str(path), **KW, embed_dim=16, queue_size=8)
