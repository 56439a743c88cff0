"""BLIP_VQA: original keys, answer ranking == brute force, training loss == formula, generate, gradients, loading."""
from pathlib import Path

import pytest
import torch

from models.blip_vqa import BLIP_VQA, blip_vqa
from models.checkpoint import CheckpointError, load_checkpoint
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

REF = Path(__file__).parent / 'reference_keys'
QUESTIONS = ['what is on the sofa?', 'is the bicycle leaning on a wall or on a tree next to the door?']
ANSWERS = ['yes', 'no', 'red', 'red car', 'two', 'on the wall', 'blue']


def reference_shapes(name: str) -> dict:
    rows = [line.rstrip('\n').split('\t') for line in open(REF / f'{name}.txt') if not line.startswith('#')]
    return {k: v for k, v, _ in rows}


def shapes(module) -> dict:
    return {k: str(list(v.shape)) for k, v in module.state_dict().items()}


def tiny_vqa(seed=0, **kwargs) -> BLIP_VQA:
    torch.manual_seed(seed)
    return BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), **kwargs)


@pytest.fixture(scope='module')
def model():
    return tiny_vqa().eval()


def images(B, seed=1):
    return torch.randn(B, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(seed))


def test_keys_equal_original_and_large_decoder_stays_768_wide():
    with torch.device('meta'):
        base = BLIP_VQA(image_size=224)
        large = BLIP_VQA(image_size=224, vit='large')
    assert shapes(base) == reference_shapes('vqa')
    # quirk 6: the encoder reads 1024-wide image tokens, the decoder 768-wide question states
    assert large.text_encoder.encoder.layer[0].crossattention.self.state_dict()['key.weight'].shape == (768, 1024)
    assert large.text_decoder.bert.encoder.layer[0].crossattention.self.state_dict()['key.weight'].shape == (768, 768)


def one_answer(model, answer: str) -> torch.Tensor:
    ids = model.tokenizer([answer], return_tensors='pt').input_ids
    ids[:, 0] = model.tokenizer.bos_token_id
    return ids                                                                   # [1, La], no padding


def brute_force(model, states, q_mask, answers):
    """Per question (unpadded states, no mask) and per candidate (unpadded): first-token prob, -summed NLL."""
    B, A = states.shape[0], len(answers)
    first, score = torch.zeros(B, A), torch.zeros(B, A)
    dec = torch.tensor([[model.tokenizer.bos_token_id]])
    for b in range(B):
        s = states[b:b + 1, :int(q_mask[b].sum())]
        probs = model.text_decoder(dec, encoder_hidden_states=s).logits[0, 0].softmax(-1)
        for a, answer in enumerate(answers):
            ids = one_answer(model, answer)
            first[b, a] = probs[ids[0, 1]]
            score[b, a] = -model.text_decoder(ids, encoder_hidden_states=s, labels=ids, reduction='none').loss[0]
    return first, score


@pytest.mark.parametrize('k', [len(ANSWERS), 3])
@torch.no_grad()
def test_rank_equals_brute_force_scoring(model, k):
    image = images(2)
    states, q_mask = model.encode_question(image, QUESTIONS)
    assert q_mask.min() == 0  # the first question is padded
    first, score = brute_force(model, states, q_mask, ANSWERS)
    ids, atts = model.tokenize_answers(ANSWERS, image.device)
    top_ids, top_scores = model.rank_answer(states, q_mask, ids, atts, k, return_topk=k)
    for b in range(2):
        kept = top_ids[b].tolist()
        dropped = [a for a in range(len(ANSWERS)) if a not in kept]
        assert len(set(kept)) == k
        if dropped:  # pruning keeps the k most probable first tokens (ties may go either way)
            assert first[b, kept].min() >= first[b, dropped].max() - 1e-6
        torch.testing.assert_close(top_scores[b], score[b, kept], atol=1e-4, rtol=1e-5)
        assert torch.all(top_scores[b, :-1] >= top_scores[b, 1:])
        # the answer: best summed score among the kept, the first-token probability not added
        assert kept[0] == max(kept, key=lambda a: score[b, a].item())
    answer_ids = model(image, QUESTIONS, ANSWERS, train=False, inference='rank', k_test=k)
    assert answer_ids.tolist() == top_ids[:, 0].tolist()


@pytest.mark.parametrize('n', [[1, 3], [2, 2]])  # gather path and shared (row-grouped) path
@torch.no_grad()
def test_training_loss_equals_formula(model, n):
    image = images(2)
    answers = ['yes', 'red car', 'two', 'on the wall']
    weights = torch.tensor([1.0, 0.5, 0.3, 0.2])
    loss = model(image, QUESTIONS, answers, n=n, weights=weights, train=True)
    states, q_mask = model.encode_question(image, QUESTIONS)
    owner = [b for b, count in enumerate(n) for _ in range(count)]
    expected = 0.0
    for i, answer in enumerate(answers):
        b = owner[i]
        ids = one_answer(model, answer)
        s = states[b:b + 1, :int(q_mask[b].sum())]
        expected += weights[i] * model.text_decoder(ids, encoder_hidden_states=s, labels=ids, reduction='none').loss[0]
    torch.testing.assert_close(loss, expected / 2, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_generate_honours_question_padding_by_default():
    model = tiny_vqa(seed=0).eval()
    for layer in model.text_decoder.bert.encoder.layer:  # make answers depend strongly on the question states
        layer.crossattention.self.kv.weight.mul_(30)   # key and value
    image = images(2)
    batched = model(image, QUESTIONS, train=False, inference='generate')   # QUESTIONS[0] is padded
    alone = model(image[:1], QUESTIONS[:1], train=False, inference='generate')
    assert len(batched) == 2 and all(isinstance(a, str) and a for a in batched)
    assert batched[0] == alone[0]
    # the original's all-ones mask lets the padding change the answer: the check above is not vacuous
    quirk = model(image, QUESTIONS, train=False, inference='generate', mask_question_padding=False)
    assert quirk[0] != alone[0] and quirk[1] == batched[1]
    model.mask_question_padding = False
    assert model(image, QUESTIONS, train=False, inference='generate') == quirk


def test_gradients_reach_every_trainable_parameter():
    model = tiny_vqa(seed=3).train()
    loss = model(images(2), QUESTIONS, ['yes', 'red car', 'two'], n=[1, 2], weights=torch.tensor([1.0, 0.6, 0.4]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_large_pretrain_decoder_cross_kv_is_dropped_and_reported(tmp_path):
    """A ViT-L pretrain decoder reads vision-width states; VQA's reads text width (quirk 6)."""
    wide_vit = dict(TINY_VIT, embed_dim=48)
    sd = BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(wide_vit)).state_dict()
    too_wide = {k for k in sd if k.startswith('text_decoder.bert.encoder.layer.') and '.crossattention.self.' in k
                and k.endswith(('key.weight', 'value.weight'))}
    for k in too_wide:
        sd[k] = torch.randn(TINY_MED['hidden_size'], 48)
    sd['visual_encoder_m.cls_token'] = torch.zeros(1, 1, 48)  # a pretrain-only key: dropped and reported
    torch.save({'model': sd}, tmp_path / 'pretrain_large.pth')
    model, msg = load_checkpoint(BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(wide_vit)),
                                 str(tmp_path / 'pretrain_large.pth'))
    assert set(msg.missing_keys) == too_wide and len(too_wide) == 2 * TINY_MED['num_hidden_layers']
    assert msg.unexpected_keys == ['visual_encoder_m.cls_token']
    key = 'text_decoder.bert.encoder.layer.0.crossattention.self.key.bias'  # same shape: loaded
    assert torch.equal(model.state_dict()[key], sd[key])
    blip_vqa(str(tmp_path / 'pretrain_large.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE,
             vit=dict(wide_vit))
    # any other gap is an error
    del sd['text_encoder.encoder.layer.0.output.dense.weight']
    torch.save({'model': sd}, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='output.dense.weight'):
        blip_vqa(str(tmp_path / 'broken.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(wide_vit))


def test_vqa_checkpoint_round_trip(tmp_path, model):
    torch.save({'model': model.state_dict()}, tmp_path / 'vqa.pth')
    loaded, msg = load_checkpoint(tiny_vqa(seed=9), str(tmp_path / 'vqa.pth'))
    assert msg.missing_keys == [] and msg.unexpected_keys == []
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
