"""The evaluation modules: engine/retrieval_eval.py (image and video) against a plain implementation of the original
protocol and its recall metrics on hand-made matrices, engine/results.py (result-file merging),
engine/caption_metrics.py (COCO caption metrics, Java), engine/vqa_eval.py (VQA accuracy)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine import distributed as du
from engine import caption_metrics, results, retrieval_eval, vqa_eval
from models.blip_retrieval import BLIP_Retrieval
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

CAPTIONS = [['a dog on a red sofa', 'a brown dog sleeping on a couch in the living room'],
            ['two people walking', 'a man and a woman walking down a busy street at night', 'people'],
            ['a bicycle leaning on a wall next to a door', 'bike'],
            ['sky', 'a clear blue sky without any clouds above the green hills'],
            ['a cat', 'a small cat sitting on a window sill looking outside', 'a kitten'],
            ['a red car parked on the street', 'a car']]


# ------------------------------------------------------------------------------------------------ fixtures

class FakeRetrievalSet(torch.utils.data.Dataset):
    """The interface of coco_karpathy_retrieval_eval: (image, index) items, text / img2txt / txt2img."""

    def __init__(self, captions, frames=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (3, TINY_IMAGE, TINY_IMAGE) if frames is None else (frames, 3, TINY_IMAGE, TINY_IMAGE)
        self.items = [torch.randn(*shape, generator=g) for _ in captions]
        self.text, self.img2txt, self.txt2img = [], {}, {}
        for i, caps in enumerate(captions):
            self.img2txt[i] = []
            for c in caps:
                self.img2txt[i].append(len(self.text))
                self.txt2img[len(self.text)] = i
                self.text.append(c)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], i


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = BLIP_Retrieval(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16,
                       queue_size=8)
    # random-init features are nearly identical for every input; perturbed weights spread the ITC
    # similarities and ITM logits (score ranges ~[-1.6, 2.4]), so rankings are a meaningful comparison
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def brute_force(model, images, texts, k, video=False):
    """The original protocol written plainly: full-length padding, image tokens repeated per candidate text,
    i2t per image and t2i per text, -100 outside the top-k."""
    tok = model.tokenizer(texts, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
    with torch.no_grad():
        if video:
            B, n_frames = images.shape[:2]
            frame_tokens = model.visual_encoder(images.flatten(0, 1))
            proj = model.vision_proj(frame_tokens[:, 0]).view(B, n_frames, -1).mean(1)
            embeds = frame_tokens.reshape(B, -1, frame_tokens.shape[-1])
        else:
            embeds = model.visual_encoder(images)
            proj = model.vision_proj(embeds[:, 0])
        img_feat = F.normalize(proj, dim=-1)
        out = model.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, mode='text')
        txt_feat = F.normalize(model.text_proj(out.last_hidden_state[:, 0]), dim=-1)
        ids = tok.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        mask = tok.attention_mask
        sims = img_feat @ txt_feat.T
        n_img, n_txt = sims.shape

        def itm(rows_ids, rows_mask, image_tokens):
            h = model.text_encoder(rows_ids, attention_mask=rows_mask, encoder_hidden_states=image_tokens,
                                   mode='multimodal').last_hidden_state[:, 0]
            return model.itm_head(h)[:, 1]

        s_i2t = torch.full((n_img, n_txt), -100.0)
        for i in range(n_img):
            val, idx = sims[i].topk(min(k, n_txt))
            s_i2t[i, idx] = itm(ids[idx], mask[idx], embeds[i:i + 1].repeat(len(idx), 1, 1)) + val
        s_t2i = torch.full((n_txt, n_img), -100.0)
        for t in range(n_txt):
            val, idx = sims[:, t].topk(min(k, n_img))
            s_t2i[t, idx] = itm(ids[t:t + 1].repeat(len(idx), 1), mask[t:t + 1].repeat(len(idx), 1),
                                embeds[idx]) + val
    return s_i2t.numpy(), s_t2i.numpy()


def assert_same_scores(got, want):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert (np.argsort(-got, axis=1, kind='stable') == np.argsort(-want, axis=1, kind='stable')).all()


# ------------------------------------------------------------------------------------------------ retrieval

@pytest.mark.parametrize('k,itm_chunk', [(3, 1024), (3, 2), (100, 1024)])
def test_evaluation_retrieval_equals_the_original_protocol(model, k, itm_chunk):
    ds = FakeRetrievalSet(CAPTIONS)
    loader = DataLoader(ds, batch_size=4)
    got_i2t, got_t2i = retrieval_eval.evaluation_retrieval(model, loader, model.tokenizer, 'cpu', k,
                                                           itm_chunk=itm_chunk)
    want_i2t, want_t2i = brute_force(model, torch.stack(ds.items), ds.text, k)
    assert got_i2t.shape == (6, 14) and got_t2i.shape == (14, 6)
    assert_same_scores(got_i2t, want_i2t)
    assert_same_scores(got_t2i, want_t2i)
    if k < 6:
        assert (got_i2t == -100).sum(1).tolist() == [14 - k] * 6
        assert (got_t2i == -100).sum(1).tolist() == [6 - k] * 14
    else:
        assert (got_i2t > -100).all() and (got_t2i > -100).all()
    assert model.training is False


def test_rank_shares_sum_to_the_one_process_matrices(model, monkeypatch):
    """Each (image, text) entry belongs to exactly one rank: the all-reduce sum is exact (simulated ranks)."""
    ds = FakeRetrievalSet(CAPTIONS)
    loader = DataLoader(ds, batch_size=4)
    full = retrieval_eval.evaluation_retrieval(model, loader, model.tokenizer, 'cpu', 3)
    shares = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(du, 'get_rank', lambda rank=rank: rank)
        monkeypatch.setattr(du, 'get_world_size', lambda: 3)
        shares.append(retrieval_eval.evaluation_retrieval(model, loader, model.tokenizer, 'cpu', 3))
    for d in (0, 1):
        np.testing.assert_allclose(sum(s[d] for s in shares), full[d], atol=1e-5, rtol=0)
        owned = [np.arange(6) % 3 == r for r in range(3)]
        for r, s in enumerate(shares):  # a rank writes its images' rows (i2t) / columns (t2i) only
            other = s[d][~owned[r]] if d == 0 else s[d][:, ~owned[r]]
            assert (other == 0).all()


def test_evaluation_retrieval_video_equals_the_original_protocol(model):
    ds = FakeRetrievalSet([[c[0]] for c in CAPTIONS[:5]], frames=3, seed=2)
    ds.txt2video, ds.video2txt = list(range(5)), list(range(5))
    loader = DataLoader(ds, batch_size=2)
    for k in (2, 10):
        got_v2t, got_t2v = retrieval_eval.evaluation_retrieval_video(model, loader, model.tokenizer, 'cpu', k)
        want_v2t, want_t2v = brute_force(model, torch.stack(ds.items), ds.text, k, video=True)
        assert got_v2t.shape == (5, 5) and got_t2v.shape == (5, 5)
        assert_same_scores(got_v2t, want_v2t)
        assert_same_scores(got_t2v, want_t2v)
    stats = retrieval_eval.itm_eval_video(got_v2t, got_t2v, ds.txt2video, ds.video2txt)
    assert set(stats) == {'txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'vid_r1', 'vid_r5', 'vid_r10',
                          'vid_r_mean', 'vid_mdR', 'r_mean'}
    assert stats['txt_r5'] == stats['vid_r5'] == 100.0  # 5 videos: everything is within the top 5


def test_itm_eval_known_ranks():
    # 3 images, 5 texts: image 0 -> texts 0,1; image 1 -> texts 2,3; image 2 -> text 4
    img2txt = {0: [0, 1], 1: [2, 3], 2: [4]}
    txt2img = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2}
    i2t = np.array([[0.1, 0.9, 0.0, 0.5, 0.2],     # best GT text (1) at position 0
                    [0.9, 0.8, 0.1, 0.7, 0.6],     # GT texts 2 (pos 4), 3 (pos 2) -> rank 2
                    [0.5, 0.4, 0.3, 0.2, 0.1]])    # GT text 4 last -> rank 4
    t2i = np.array([[0.9, 0.1, 0.0],               # rank 0
                    [0.1, 0.9, 0.0],               # rank 1
                    [0.0, 0.9, 0.1],               # rank 0
                    [0.5, 0.4, 0.3],               # rank 1
                    [0.0, 0.1, 0.2]])              # rank 0
    out = retrieval_eval.itm_eval(i2t, t2i, txt2img, img2txt)
    assert out['txt_r1'] == pytest.approx(100 / 3) and out['txt_r5'] == 100 and out['txt_r10'] == 100
    assert out['img_r1'] == pytest.approx(60) and out['img_r5'] == 100
    assert out['txt_r_mean'] == pytest.approx((100 / 3 + 200) / 3)
    assert out['img_r_mean'] == pytest.approx(260 / 3)
    assert out['r_mean'] == pytest.approx((out['txt_r_mean'] + out['img_r_mean']) / 2)
    assert all(type(v) is float for v in out.values())


def test_itm_eval_video_median_rank():
    n = 12
    v2t = np.eye(n)                                  # every video's text first
    t2v = np.zeros((n, n))
    ranks = [0, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]   # wanted 0-based rank of each text's video
    for t, r in enumerate(ranks):
        order = [v for v in range(n) if v != t]
        order.insert(r, t)
        t2v[t, order] = np.arange(n, 0, -1)
    out = retrieval_eval.itm_eval_video(v2t, t2v, list(range(n)), list(range(n)))
    assert out['txt_r1'] == 100
    assert out['vid_r1'] == pytest.approx(200 / 12) and out['vid_r5'] == pytest.approx(600 / 12)
    assert out['vid_r10'] == pytest.approx(1000 / 12)
    assert out['vid_mdR'] == np.median(np.array(ranks) + 1) == 5.5


# ------------------------------------------------------------------------------------------------ save_result

def test_save_result_merges_ranks_in_order_and_drops_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(du, 'get_world_size', lambda: 2)
    shards = {0: [{'image_id': 3, 'caption': 'a'}, {'image_id': 1, 'caption': 'b'}],
              1: [{'image_id': 2, 'caption': 'c'}, {'image_id': 3, 'caption': 'padded duplicate'}]}
    for rank in (1, 0):  # rank 1 writes its shard first; rank 0 merges after the (no-op) barrier
        monkeypatch.setattr(du, 'get_rank', lambda rank=rank: rank)
        monkeypatch.setattr(du, 'is_main_process', lambda rank=rank: rank == 0)
        path = results.save_result(shards[rank], tmp_path / 'res', 'val_epoch0', remove_duplicate='image_id')
    assert path == str(tmp_path / 'res' / 'val_epoch0.json')
    assert json.loads((tmp_path / 'res' / 'val_epoch0.json').read_text()) == [
        {'image_id': 3, 'caption': 'a'}, {'image_id': 1, 'caption': 'b'}, {'image_id': 2, 'caption': 'c'}]
    assert json.loads((tmp_path / 'res' / 'val_epoch0_rank1.json').read_text()) == shards[1]
    assert not list((tmp_path / 'res').glob('*.tmp'))


def test_save_result_keeps_duplicates_without_a_key(tmp_path):
    rows = [{'question_id': 1, 'answer': 'yes'}, {'question_id': 1, 'answer': 'yes'}]
    path = results.save_result(rows, tmp_path, 'vqa_result')
    assert json.loads(open(path).read()) == rows
    with pytest.raises(KeyError, match='image_id'):
        results.save_result(rows, tmp_path, 'x', remove_duplicate='image_id')


def test_result_files_get_the_umask_permissions_not_private_ones(tmp_path):
    # an atomic write through tempfile.mkstemp left every result file 0600: unreadable by the rest of a
    # research group (or by the account that uploads a VQA result to EvalAI)
    old = os.umask(0o022)
    try:
        path = results.save_result([{'image_id': 1, 'caption': 'a'}], tmp_path, 'val')
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ['val.json', 'val_rank0.json']      # the merged file and this rank's part, no temporaries
    assert {os.stat(tmp_path / f).st_mode & 0o777 for f in files} == {0o644}


# ------------------------------------------------------------------------------------------------ captions

GT_CAPTIONS = {1: ['a black dog runs across the grass', 'a dog running on a lawn'],
               2: ['a plate of pasta with tomato sauce', 'spaghetti on a white plate'],
               3: ['a man riding a wave on a surfboard', 'a surfer in the ocean'],
               4: ['an empty train station at night', 'a platform with no people']}   # not in the results


def _spice_unavailable():
    raise OSError('cannot download Stanford CoreNLP models (offline)')


def test_coco_caption_eval_perfect_captions_and_missing_spice(tmp_path, monkeypatch):
    gt = {'images': [{'id': i} for i in GT_CAPTIONS],
          'annotations': [{'image_id': i, 'id': 10 * i + j, 'caption': c}
                          for i, caps in GT_CAPTIONS.items() for j, c in enumerate(caps)]}
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    results = [{'image_id': i, 'caption': GT_CAPTIONS[i][0]} for i in (1, 2, 3)]
    (tmp_path / 'res.json').write_text(json.dumps(results))
    scorers = [(f, n) if n != ('SPICE',) else (_spice_unavailable, n) for f, n in caption_metrics.CAPTION_SCORERS]
    monkeypatch.setattr(caption_metrics, 'CAPTION_SCORERS', scorers)
    with pytest.warns(RuntimeWarning, match='SPICE unavailable.*offline'):
        out = caption_metrics.coco_caption_eval(str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'))
    assert out['SPICE'] is None
    assert set(out) == {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'}
    assert all(type(v) is float for k, v in out.items() if k != 'SPICE')
    assert out['Bleu_4'] > 0.95 and out['Bleu_1'] > 0.95
    assert out['CIDEr'] > 1.0 and out['ROUGE_L'] > 0.95 and out['METEOR'] > 0.5


def test_coco_caption_eval_required_metric_failure_is_raised(tmp_path, monkeypatch):
    gt = {'images': [{'id': 1}], 'annotations': [{'image_id': 1, 'id': 1, 'caption': 'a dog'}]}
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    (tmp_path / 'res.json').write_text(json.dumps([{'image_id': 1, 'caption': 'a dog'}]))
    monkeypatch.setattr(caption_metrics, 'CAPTION_SCORERS', [(_spice_unavailable, ('CIDEr',))])
    with pytest.raises(OSError, match='offline'):
        caption_metrics.coco_caption_eval(str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'))
    monkeypatch.setattr(caption_metrics.shutil, 'which', lambda name: None)
    with pytest.raises(RuntimeError, match='needs Java'):
        caption_metrics.coco_caption_eval(str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'))


# ------------------------------------------------------------------------------------------------ VQA

@pytest.mark.parametrize('n_match,expected', [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (10, 100.0)])
def test_vqa_accuracy_leave_one_out(n_match, expected):
    # per subset of 9 annotators: min(1, matches / 3); leaving out a matching annotator removes one match
    answers = ['two'] * n_match + ['three'] * (10 - n_match)
    ann = [{'question_id': 7, 'answer': answers}]
    assert vqa_eval.vqa_accuracy([{'question_id': 7, 'answer': '2'}], ann) == pytest.approx(expected)


def test_vqa_accuracy_normalisation_averaging_and_errors():
    ann = [{'question_id': 1, 'answer': ['T-Shirt'] * 10},
           {'question_id': 2, 'answer': [{'answer': 'the dog.'}] * 3},          # official dict format, 3 answers
           {'question_id': 3, 'answer': 'yes'}]                                  # one answer: exact match
    res = [{'question_id': 1, 'answer': 't shirt'}, {'question_id': 2, 'answer': 'Dog'},
           {'question_id': 3, 'answer': 'no'}]
    # q2: 3 answers, leave-one-out keeps 2 matches of 3 -> 2/3 each
    assert vqa_eval.vqa_accuracy(res, ann) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert vqa_eval.normalize_vqa_answer("Dont know, 1,000 Apples.") == "don't know 1000 apples"
    assert vqa_eval.normalize_vqa_answer('3.5 ten') == '3.5 10'
    with pytest.raises(KeyError, match='question_id 99'):
        vqa_eval.vqa_accuracy([{'question_id': 99, 'answer': 'yes'}], ann)


def test_caption_evaluation_is_quiet_and_an_unavailable_spice_is_tried_and_warned_about_once(tmp_path, monkeypatch,
                                                                                              capfd):
    """Each evaluation printed pycocotools' and the scorers' progress (~40 lines per epoch) and SPICE's download
    notice and warning 8 times per run."""
    import warnings
    gt = {'images': [{'id': i} for i in GT_CAPTIONS],
          'annotations': [{'image_id': i, 'id': 10 * i + j, 'caption': c}
                          for i, caps in GT_CAPTIONS.items() for j, c in enumerate(caps)]}
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    (tmp_path / 'res.json').write_text(json.dumps([{'image_id': 1, 'caption': 'a dog on the grass'}]))
    tries = []

    def spice_offline():
        tries.append(1)
        print('Downloading stanford-corenlp-3.6.0 for SPICE ...')
        raise OSError('offline')

    scorers = [(f, n) if n != ('SPICE',) else (spice_offline, n) for f, n in caption_metrics.CAPTION_SCORERS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(4):  # val and test of two epochs
            out = caption_metrics.coco_caption_eval(str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'),
                                                    scorers=scorers)
            assert out['SPICE'] is None and out['CIDEr'] is not None
    assert len(tries) == 1 and len([w for w in caught if 'SPICE' in str(w.message)]) == 1
    printed = capfd.readouterr().out
    assert 'Downloading' not in printed and 'creating index' not in printed and 'testlen' not in printed
    assert len(printed.splitlines()) == 4 * 8  # one line per metric
