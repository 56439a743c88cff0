"""Short CPU runs of the real task scripts on the toy dataset must learn, so that a broken loss, mask,
label or evaluation fails them:

* captioning: CIDEr clearly above what one caption for every image scores ("mode collapse", ~0.55 here);
* retrieval: recall@1 several times chance (chance is 1/30 with 30 test images);
* CapFilt with that captioner and that retrieval model as the filter removes the noisy toy web pairs
  (captions of other images) far more precisely than chance;
* VQA and NLVR: ``test_learning_vqa.py``, ``test_learning_nlvr.py``.

The toy model learns this fast only with ``configs/toy/med_config.json``'s initialisation range 0.1 and
no dropout: with BERT's 0.02, the random text encoder gives every caption nearly the same [CLS] feature
and ITC/ITM stay at chance for hundreds of steps (measured with benchmarks/toy_learning_sweep.py).

One module per training run (VQA and NLVR in ``test_learning_vqa.py`` / ``test_learning_nlvr.py``): the
suite's workers take whole modules (``--dist loadfile``), so the runs go to different workers while the
tests that share a run stay with it. ``pytestmark = learning`` puts them at the front of the queue.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.toy import ensure_toy_dataset
from tests.toy_runs import ROOT, run

pytestmark = pytest.mark.learning


@pytest.fixture(scope='module')
def toy(module_dir) -> Path:
    # 200 web images: the noisy pairs CapFilt must find
    return ensure_toy_dataset(module_dir('toy'), n_train=300, n_val=30, n_test=30, n_web=200,
                              n_videos=2, video_frames=2)


@pytest.fixture(scope='module')
def caption_run(toy, module_dir) -> tuple[list[dict], Path]:
    out = module_dir('caption')
    return run('train_caption', 'caption', toy, out, f'image_root={toy}/images',
               f'coco_gt_root={toy}/annotation/coco_gt', 'max_epoch=3', 'init_lr=3e-3', 'num_beams=2'), out


@pytest.fixture(scope='module')
def retrieval_run(toy, module_dir) -> tuple[list[dict], Path]:
    out = module_dir('retrieval')
    return run('train_retrieval', 'retrieval', toy, out, f'image_root={toy}/images', 'max_epoch=12'), out


def test_captioning_learns(caption_run):
    stats = caption_run[0][-1]
    print(stats)
    # measured: val 1.67 after 3 epochs (138 steps); mode collapse scores ~0.55
    assert stats['val_CIDEr'] > 0.9 and stats['test_CIDEr'] > 0.9


def test_retrieval_learns(retrieval_run):
    log = retrieval_run[0]
    last = log[-1]
    best_test = [e for e in log if 'test_txt_r1' in e][-1]   # test is evaluated at the best val epoch
    print(last, best_test)
    val_r1 = (last['val_txt_r1'] + last['val_img_r1']) / 2
    test_r1 = (best_test['test_txt_r1'] + best_test['test_img_r1']) / 2
    # chance is 3.3; measured after 12 epochs (552 steps), 5 runs (seeds, machines): mean R@1 val 23-33
    assert val_r1 > 12 and test_r1 > 12, (val_r1, test_r1)
    assert last['train_loss_ita'] < 4.6   # ln(32 + 256) = 5.66 at chance; measured 3.7-3.9


def test_capfilt_removes_noisy_web_pairs(toy, caption_run, retrieval_run, tmp_path):
    import capfilt
    from toy_capfilt import noise_removal, web_score_auc
    ann = toy / 'annotation'
    capfilt.main(['--config', str(ROOT / 'configs' / 'toy' / 'capfilt.yaml'), '--output_dir', str(tmp_path),
                  '--device', 'cpu', '--seed', '0', '--options', f'toy_root={toy}', f'image_root={toy}/images',
                  f'ann_file=[{ann}/pretrain_noisy.json]', f'human_ann_file=[{ann}/coco_karpathy_train.json]',
                  f'captioner={caption_run[1]}/checkpoint_best.pth', f'filter={retrieval_run[1]}/checkpoint_last.pth'])
    noisy = json.loads((ann / 'pretrain_noisy.json').read_text())
    truth = json.loads((ann / 'pretrain_noisy_truth.json').read_text())
    kept = json.loads((tmp_path / 'capfilt_annotations.json').read_text())
    removal = noise_removal(noisy, truth, kept, set())
    auc = web_score_auc(tmp_path, truth)
    print(removal, auc)
    # The filter's scores must rank clean web pairs above noisy ones (60 of the 200 web captions belong to
    # other images; chance AUC 0.5). The filter is the retrieval run's last checkpoint: "best" is picked by
    # recall on 30 validation images, a noisy choice (one seed's best epoch gave AUC 0.72, its last 0.92).
    # Measured with the last checkpoint over 6 seeds: AUC 0.87-0.96.
    assert auc > 0.75, (auc, removal)
    # At the threshold, noisy pairs must be removed more often than clean ones, i.e. precision above the
    # 0.30 of removing at random. Where the toy filter's ITM probabilities sit around 0.5 varies between
    # runs (last checkpoints, 6 seeds: removed 77-134 of 200, precision 0.43-0.73, recall 0.80-0.97; best
    # checkpoints removed up to 177), so the bound is chance, not a tuned number.
    assert 0 < removal['removed'] < removal['web_pairs'] and removal['precision'] > removal['chance_precision'], removal
    # and most noisy pairs must go (issue 6: precision and recall): measured recall 0.80-0.97 over those seeds;
    # a filter that removed a handful of pairs would pass the precision bound alone
    assert removal['recall'] > 0.5, removal


def test_web_score_auc_ranks_clean_above_noisy(tmp_path):
    from toy_capfilt import web_score_auc
    (tmp_path / 'shards').mkdir()
    records = [{'i': i, 'w': w, 's': []} for i, w in enumerate([0.9, 0.2, 0.7, 0.2, 0.1])]
    (tmp_path / 'shards' / 'shard_000000.json').write_text(json.dumps({'records': records[:3]}))
    (tmp_path / 'shards' / 'shard_000001.json').write_text(json.dumps({'records': records[3:]}))
    truth = [False, True, False, True, True]                 # noisy: 0.2, 0.2, 0.1 -- all below the clean ones
    assert web_score_auc(tmp_path, truth) == 1.0
    assert web_score_auc(tmp_path, [not t for t in truth]) == 0.0
    # clean {0.9, 0.7, 0.2} vs noisy {0.2, 0.1}: 5 of 6 pairs ordered, one tie counted half
    assert web_score_auc(tmp_path, [False, True, False, False, True]) == pytest.approx(5.5 / 6)
