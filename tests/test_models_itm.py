"""BLIP_ITM: 'itm' logits with [ENC] (default) or [CLS] (the original) first, 'itc' cosine matrix, factory checks."""
import pytest
import torch
import torch.nn.functional as F

from models.blip import BLIP_Decoder
from models.blip_itm import BLIP_ITM, blip_itm
from models.checkpoint import CheckpointError
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

CAPTIONS = ['a dog on a red sofa', 'two people', 'a bicycle leaning on a wall next to a door']
KW = dict(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return BLIP_ITM(**KW).eval()


def images(B, seed=1):
    return torch.randn(B, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(seed))


def manual_itm(model, image, first_token_id):
    text = model.tokenizer(CAPTIONS, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
    ids = text.input_ids.clone()
    if first_token_id is not None:
        ids[:, 0] = first_token_id
    out = model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=model.visual_encoder(image),
                             mode='multimodal')
    return model.itm_head(out.last_hidden_state[:, 0])


@torch.no_grad()
def test_itm_first_token_enc_by_default_cls_reproduces_the_original(model):
    image = images(3)
    enc, cls = model(image, CAPTIONS), model(image, CAPTIONS, itm_first_token='cls')
    assert enc.shape == (3, 2) and enc.dtype == torch.float32
    torch.testing.assert_close(enc, manual_itm(model, image, model.tokenizer.enc_token_id))
    torch.testing.assert_close(cls, manual_itm(model, image, None))          # [CLS] as tokenised
    assert not torch.allclose(enc, cls)
    torch.manual_seed(0)
    original = BLIP_ITM(**KW, itm_first_token='cls').eval()
    torch.testing.assert_close(original(image, CAPTIONS), cls)
    with pytest.raises(ValueError):
        model(image, CAPTIONS, itm_first_token='sep')


@torch.no_grad()
def test_itc_is_the_cosine_similarity_matrix(model):
    image = images(2)
    sim = model(image, CAPTIONS, match_head='itc')
    text = model.tokenizer(CAPTIONS, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
    txt = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state[:, 0]
    img = model.visual_encoder(image)[:, 0]
    expected = F.cosine_similarity(model.vision_proj(img)[:, None], model.text_proj(txt)[None], dim=-1)
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, expected)
    with pytest.raises(ValueError):
        model(image, CAPTIONS, match_head='cosine')


def test_factory_requires_every_key(tmp_path):
    torch.manual_seed(0)
    torch.save({'model': BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).state_dict()},
               tmp_path / 'decoder.pth')
    with pytest.raises(CheckpointError, match='blip_itm'):
        blip_itm(str(tmp_path / 'decoder.pth'), **KW)


def test_similarity_api_gives_the_three_scores_of_many_pairs_in_one_call(model):
    """pair_scores = (ITC cosine, ITM match probability, ITM match logit + ITC cosine) of pair b, as forward's two
    heads give them; one image is scored against every caption; features give the all-against-all ITC matrix."""
    image, texts = images(3), ['a red circle', 'two blue squares on the left', 'a green triangle']
    with torch.no_grad():
        scores = model.pair_scores(image, texts)
        logits = model(image, texts, match_head='itm')
        cosines = model(image, texts, match_head='itc')                                    # [3, 3]
        torch.testing.assert_close(scores.itc, cosines.diagonal())
        torch.testing.assert_close(scores.itm, logits.softmax(-1)[:, 1])
        torch.testing.assert_close(scores.sum, logits[:, 1] + cosines.diagonal())
        torch.testing.assert_close(model.image_features(image) @ model.text_features(texts).T, cosines)
        one = model.pair_scores(image[:1], texts)                                          # image 0 vs each text
        torch.testing.assert_close(one.itc, cosines[0])
        torch.testing.assert_close(one.itm, model(image[:1].expand(3, -1, -1, -1), texts).softmax(-1)[:, 1])
    with pytest.raises(ValueError, match='2 images for 3 texts'):
        model.pair_scores(image[:2], texts)
