"""Parity with transformers' BLIP classes (tiny random configs, no hub), through ``models.convert_hf``.

Measured on CPU fp32 (transformers 5.x, torch 2.14; run with ``-s`` to print them):
  * ViT tokens vs ``BlipVisionModel``: max |diff| 9.5e-7 (SDPA vs HF's explicit softmax).
  * LM logits vs ``BlipForConditionalGeneration`` on a padded batch, every position: 4.1e-6;
    LM loss (label smoothing 0.1 on both sides, same labels): 0.0 (bitwise equal here).
  * Greedy tokens: identical. Beam search (3 beams) when [SEP] never competes: identical.
  * Beam search when [SEP] competes: transformers 5 is NOT transformers 4.15 (which the original
    used), so tokens legitimately differ (while writing this test: 11 of 16 tiny cases with the caption
    prompt, 6 of 12 with the VQA prompt). What changed in transformers: finished hypotheses are scored by
    ``sum_logprobs / (generated tokens incl. [SEP])`` instead of ``/ len(prompt + generated)``, the
    early-stop test uses the best *running* beam over ``cur_len - prompt_len`` (PR #20901), and
    ``pad_token_id=0`` is falsy there, so finished rows are filled with [SEP] instead of [PAD].
    We therefore check our beam search against a literal port of 4.15's ``BeamSearchScorer``
    driven by the HF model's own logits: identical tokens in every case.
"""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip('transformers')
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,  # noqa: E402
                          BlipForQuestionAnswering)

from models.blip import BLIP_Decoder  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.convert_hf import (blip_to_hf, blip_to_hf_dropped, hf_config_to_blip_kwargs, hf_to_blip,  # noqa: E402
                               load_hf_blip, main as convert_main)
from models.generation import generate  # noqa: E402
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT, randomize  # noqa: E402

SEP, PAD, DEC = 102, 0, 30522
CAPTION_PROMPT = [DEC, 1037, 3861, 1997]  # "[DEC] a picture of"
WORDS = [1000, 1001, 1002, 1003, 1004, 1005]


def tiny_hf_config() -> BlipConfig:
    """BLIP's numerics, not HF's defaults: vision LN eps 1e-6 (HF default 1e-5), smoothing 0.1 (HF 0.0);
    hidden_act 'gelu' is the exact erf GELU on both sides."""
    v, t = TINY_VIT, TINY_MED
    return BlipConfig(
        vision_config=dict(hidden_size=v['embed_dim'], intermediate_size=4 * v['embed_dim'], num_hidden_layers=v['depth'],
                           num_attention_heads=v['num_heads'], patch_size=v['patch_size'], image_size=TINY_IMAGE,
                           layer_norm_eps=1e-6, hidden_act='gelu'),
        text_config=dict(hidden_size=t['hidden_size'], intermediate_size=t['intermediate_size'],
                         num_hidden_layers=t['num_hidden_layers'], num_attention_heads=t['num_attention_heads'],
                         vocab_size=30524, max_position_embeddings=t['max_position_embeddings'], layer_norm_eps=1e-12,
                         hidden_act='gelu', label_smoothing=0.1, bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD))


@torch.no_grad()
def set_vocab_bias(hf_model, sep_bias: float) -> None:
    """Few live words (and a [SEP] of the given strength): beams collide and hypotheses end early."""
    bias = hf_model.text_decoder.cls.predictions.bias
    bias.fill_(-30)
    bias[WORDS] = 0
    bias[SEP] = sep_bias
    assert hf_model.text_decoder.cls.predictions.decoder.bias is bias  # HF ties the duplicate bias


def to_ours(hf_model, ours):
    ours.load_state_dict(hf_to_blip(hf_model.state_dict()), strict=True)
    return ours


@pytest.fixture(scope='module')
def captioner():
    hf = randomize(BlipForConditionalGeneration(tiny_hf_config()))
    ours = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).eval()
    return hf, to_ours(hf, ours)


def images(B, seed=0):
    return torch.randn(B, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(seed)) * 2


def up_to_sep(rows, prompt_len):
    """Token lists cut after the first [SEP] past the prompt (HF 5 fills finished beams with [SEP], not [PAD])."""
    out = []
    for r in rows:
        r = [t for t in (r.tolist() if torch.is_tensor(r) else r)]
        if SEP in r[prompt_len:]:
            r = r[:prompt_len + r[prompt_len:].index(SEP) + 1]
        while r and r[-1] == PAD:
            r.pop()
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------ conversion

def test_round_trip_and_hf_strict_load(captioner):
    hf, ours = captioner
    sd = ours.state_dict()
    hf_sd = blip_to_hf(sd, 'BlipForConditionalGeneration')
    BlipForConditionalGeneration(tiny_hf_config()).load_state_dict(hf_sd, strict=True)
    assert blip_to_hf_dropped(sd, 'caption') == ['text_decoder.bert.embeddings.position_ids']
    back = hf_to_blip(hf_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert hf_to_blip(back).keys() == sd.keys()  # idempotent on original-layout keys
    # shapes the tables rely on: cls [1,1,D], pos [1,N,D]
    assert hf.vision_model.embeddings.class_embedding.shape == sd['visual_encoder.cls_token'].shape == (1, 1, 32)
    assert hf.vision_model.embeddings.position_embedding.shape == sd['visual_encoder.pos_embed'].shape == (1, 17, 32)


def test_token_type_embeddings_are_refused():
    with pytest.raises(ValueError, match='token-type'):
        hf_to_blip({'text_encoder.embeddings.token_type_embeddings.weight': torch.zeros(2, 4)})


def test_save_pretrained_folder_and_bin_load_into_our_model(captioner, tmp_path):
    hf, ours = captioner
    hf.save_pretrained(tmp_path / 'hf')                           # safetensors, tied copies omitted
    convert_main([str(tmp_path / 'hf'), str(tmp_path / 'model.pth')])
    torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')   # HF layout read by load_checkpoint itself
    kwargs = hf_config_to_blip_kwargs(hf.config)
    assert kwargs['vit'] == TINY_VIT and kwargs['image_size'] == TINY_IMAGE
    for path in (tmp_path / 'model.pth', tmp_path / 'pytorch_model.bin', tmp_path / 'hf'):
        model = BLIP_Decoder(**kwargs).eval()
        model, msg = load_checkpoint(model, str(path), verbose=False)
        assert msg.missing_keys == [] and msg.unexpected_keys == []
        for k, v in ours.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    assert load_hf_blip(tmp_path / 'hf').keys() == ours.state_dict().keys()


# ------------------------------------------------------------------------------------------ captioning

@torch.no_grad()
def test_caption_logits_and_loss_match_hf(captioner):
    hf, ours = captioner
    image = images(3)
    ids = torch.tensor([CAPTION_PROMPT + [2000, 2001, 2002, SEP],
                        CAPTION_PROMPT + [2003, SEP, PAD, PAD],
                        CAPTION_PROMPT + [2004, 2005, SEP, PAD]])
    mask = (ids != PAD).long()
    labels = ids.masked_fill(ids == PAD, -100)
    labels[:, :len(CAPTION_PROMPT)] = -100  # BLIP_Decoder's targets: no loss on the prompt
    ref = hf(pixel_values=image, input_ids=ids, attention_mask=mask, labels=labels)
    image_embeds = ours.visual_encoder(image)
    out = ours.text_decoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds, labels=labels)
    vis, logit, loss = [(a - b).abs().max().item() for a, b in
                        ((image_embeds, ref.image_embeds), (out.logits, ref.logits), (out.loss, ref.loss))]
    print(f'\nvision max|diff| {vis:.2e}  LM logits {logit:.2e}  loss {loss:.2e}')
    # padded positions too: both use additive masks that zero the padded keys
    assert vis < 1e-5 and logit < 1e-5 and loss < 1e-5


@pytest.mark.parametrize('sep_bias', [-3.0, 0.0, 1.0])
def test_greedy_tokens_match_hf(captioner, sep_bias):
    hf, ours = captioner
    set_vocab_bias(hf, sep_bias)
    to_ours(hf, ours)
    image, prompt = images(3, seed=int(sep_bias) + 5), torch.tensor([CAPTION_PROMPT] * 3)
    with torch.no_grad():
        mine = generate(ours.text_decoder, prompt, ours.visual_encoder(image), max_length=14, min_length=6)
        theirs = hf.generate(pixel_values=image, input_ids=torch.cat([prompt, torch.full((3, 1), SEP)], 1),
                             num_beams=1, do_sample=False, max_length=14, min_length=6)
    assert up_to_sep(mine, 4) == up_to_sep(theirs, 4)


@pytest.mark.parametrize('repetition_penalty', [1.0, 1.5])
def test_beam_tokens_match_hf_when_sep_does_not_compete(captioner, repetition_penalty):
    """Where HF 5's and 4.15's bookkeeping agree (no hypothesis ends before max_length), tokens are equal."""
    hf, ours = captioner
    set_vocab_bias(hf, -30.0)
    to_ours(hf, ours)
    image, prompt = images(3, seed=1), torch.tensor([CAPTION_PROMPT] * 3)
    with torch.no_grad():
        mine = generate(ours.text_decoder, prompt, ours.visual_encoder(image), num_beams=3, max_length=14,
                        min_length=6, repetition_penalty=repetition_penalty)
        theirs = hf.generate(pixel_values=image, input_ids=torch.cat([prompt, torch.full((3, 1), SEP)], 1),
                             num_beams=3, do_sample=False, max_length=14, min_length=6,
                             repetition_penalty=repetition_penalty)
    assert up_to_sep(mine, 4) == up_to_sep(theirs, 4)


def beam_search_4_15(step_logits, prompt, k, max_length, min_length, eos=SEP, pad=PAD):
    """transformers 4.15 ``beam_search`` + ``BeamSearchScorer`` + ``BeamHypotheses`` (length_penalty 1,
    early_stopping False), literal and uncached. ``step_logits(ids [B*k, L]) -> [B*k, V]``."""
    B = prompt.shape[0]
    ids = prompt.repeat_interleave(k, 0)
    beam_scores = torch.zeros(B, k)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps, worst, done = [[] for _ in range(B)], [1e9] * B, [False] * B

    def add(b, hyp, sum_logprobs):
        score = sum_logprobs / len(hyp)
        if len(hyps[b]) < k or score > worst[b]:
            hyps[b].append((score, hyp))
            if len(hyps[b]) > k:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps[b]))
                del hyps[b][ranked[0][1]]
                worst[b] = ranked[1][0]
            else:
                worst[b] = min(score, worst[b])

    while True:
        cur_len = ids.shape[1]
        scores = F.log_softmax(step_logits(ids).float(), -1)
        if cur_len < min_length:
            scores[:, eos] = -float('inf')
        V = scores.shape[1]
        top, flat = (scores + beam_scores[:, None]).view(B, k * V).topk(2 * k, dim=1)
        next_scores, next_tokens, next_rows = [], [], []
        for b in range(B):
            if done[b]:
                next_scores += [0.0] * k
                next_tokens += [pad] * k
                next_rows += [b * k] * k
                continue
            chosen = 0
            for rank in range(2 * k):
                row, token = b * k + flat[b, rank].item() // V, flat[b, rank].item() % V
                if token == eos:
                    if rank >= k:
                        continue
                    add(b, ids[row].tolist(), top[b, rank].item())
                else:
                    next_scores.append(top[b, rank].item())
                    next_tokens.append(token)
                    next_rows.append(row)
                    chosen += 1
                if chosen == k:
                    break
            done[b] = done[b] or (len(hyps[b]) >= k and worst[b] >= top[b].max().item() / cur_len)
        beam_scores = torch.tensor(next_scores)
        ids = torch.cat([ids[torch.tensor(next_rows)], torch.tensor(next_tokens)[:, None]], 1)
        if all(done) or ids.shape[1] >= max_length:
            break
    for b in range(B):
        if not done[b]:
            for j in range(k):
                add(b, ids[b * k + j].tolist(), beam_scores[b * k + j].item())
    best = [sorted(h, key=lambda x: x[0])[-1][1] for h in hyps]
    return [seq + [eos] if len(seq) < max_length else seq for seq in best]


@pytest.mark.parametrize('prompt_ids,max_length,min_length', [(CAPTION_PROMPT, 14, 6), ([DEC], 10, 1)])
@pytest.mark.parametrize('sep_bias', [0.0, 2.0])
def test_beam_tokens_match_transformers_4_15_on_hf_logits(captioner, prompt_ids, max_length, min_length, sep_bias):
    """[SEP] competes: our beam search == 4.15's bookkeeping run on the HF model's logits (HF 5's own
    ``generate`` differs here by design, see the module docstring)."""
    hf, ours = captioner
    set_vocab_bias(hf, sep_bias)
    to_ours(hf, ours)
    B, k = 4, 3
    image, prompt = images(B, seed=2), torch.tensor([prompt_ids] * B)
    with torch.no_grad():
        mine = generate(ours.text_decoder, prompt, ours.visual_encoder(image), num_beams=k, max_length=max_length,
                        min_length=min_length)
        states = hf.vision_model(image).last_hidden_state.repeat_interleave(k, 0)
        ref = beam_search_4_15(lambda ids: hf.text_decoder(ids, encoder_hidden_states=states).logits[:, -1],
                               prompt, k, max_length, min_length)
    assert up_to_sep(mine, len(prompt_ids)) == up_to_sep(ref, len(prompt_ids))


# ------------------------------------------------------------------------------------------ ITM / ITC, VQA
# ITM/ITC and VQA generation against HF (reference 5.6/5.7). Both compare the original's behaviour:
# BLIP_ITM with itm_first_token='cls' and VQA with the question padding left unmasked.

CAPTIONS = ['a dog on a red sofa', 'two people', 'a very long caption about a bicycle leaning on a wall']


@pytest.fixture(scope='module')
def itm_pair():
    blip_itm = pytest.importorskip('models.blip_itm')
    hf = randomize(BlipForImageTextRetrieval(tiny_hf_config()), seed=1)
    ours = blip_itm.BLIP_ITM(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), itm_first_token='cls').eval()
    return hf, to_ours(hf, ours)


@torch.no_grad()
def test_itm_and_itc_match_hf(itm_pair):
    """HF's ITM feeds ``input_ids`` as given, i.e. [CLS] first unless the caller changes it: the original
    BLIP_ITM quirk (reference 4). ITC: cosine of projected CLS features, no temperature, on both sides."""
    hf, ours = itm_pair
    image = images(3, seed=3)
    text = ours.tokenizer(CAPTIONS, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
    itm_ref = hf(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=image,
                 use_itm_head=True).itm_score
    itc_ref = hf(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=image,
                 use_itm_head=False).itm_score
    itm, itc = ours(image, CAPTIONS, match_head='itm'), ours(image, CAPTIONS, match_head='itc')
    d_itm, d_itc = (itm - itm_ref).abs().max().item(), (itc - itc_ref).abs().max().item()
    print(f'\nITM logits max|diff| {d_itm:.2e}  ITC similarities {d_itc:.2e}')
    assert itm.shape == (3, 2) and itc.shape == (3, 3)
    assert d_itm < 1e-5 and d_itc < 1e-5


@pytest.fixture(scope='module')
def vqa_pair():
    blip_vqa = pytest.importorskip('models.blip_vqa')
    hf = randomize(BlipForQuestionAnswering(tiny_hf_config()), seed=2)
    ours = blip_vqa.BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).eval()
    return hf, to_ours(hf, ours)


QUESTIONS = ['what is on the sofa?', 'how many?', 'is the bicycle leaning on a wall or on a tree?']


@pytest.mark.parametrize('sep_bias', [-30.0, 2.0])
@torch.no_grad()
def test_vqa_generated_answers_match(vqa_pair, sep_bias):
    """Both mask question padding in the encoder and NOT in the decoder's cross-attention (HF's
    ``generate`` passes an all-ones question mask, the original's quirk), with [ENC] first.
    sep_bias -30: [SEP] never competes, HF 5's own beam search must agree; sep_bias 2: it competes, so
    the reference is 4.15's bookkeeping on HF's logits (see the module docstring)."""
    hf, ours = vqa_pair
    set_vocab_bias(hf, sep_bias)
    to_ours(hf, ours)
    image = images(3, seed=4)
    q = ours.tokenizer(QUESTIONS, padding='longest', truncation=True, max_length=35, return_tensors='pt')
    ids = q.input_ids.clone()
    ids[:, 0] = ours.tokenizer.enc_token_id
    answers = ours(image, QUESTIONS, train=False, inference='generate', mask_question_padding=False)
    if sep_bias < 0:
        ref = hf.generate(input_ids=ids, pixel_values=image, attention_mask=q.attention_mask, num_beams=3,
                          max_length=10, min_length=1, do_sample=False)
        ref = up_to_sep(ref, 1)
    else:
        image_embeds = hf.vision_model(image).last_hidden_state
        states = hf.text_encoder(ids, attention_mask=q.attention_mask, encoder_hidden_states=image_embeds).last_hidden_state
        states = states.repeat_interleave(3, 0)
        ref = beam_search_4_15(lambda a: hf.text_decoder(a, encoder_hidden_states=states).logits[:, -1],
                               torch.full((3, 1), DEC), 3, 10, 1)
    assert answers == [ours.tokenizer.decode(r, skip_special_tokens=True) for r in ref]
