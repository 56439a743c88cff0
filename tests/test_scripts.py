"""Every task script end to end on a small toy dataset with a tiny model: as ``python`` (in process)
and as a 2-process ``torchrun`` on CPU (gloo). Outputs, checkpoints and logs must be written."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.toy import ensure_toy_dataset
from tests.toy_runs import script_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy')
    return ensure_toy_dataset(root, n_train=16, n_val=8, n_test=8, n_web=16, n_videos=4, video_frames=4)


def script_options(script: str, root: Path) -> list[str]:
    """``--options`` pointing a toy config at ``root``, shrunk to seconds of CPU work."""
    r = str(root)
    images, ann = f'image_root={r}/images', f'ann_root={r}/annotation'
    base = [f'toy_root={r}', 'num_workers=0', 'image_size=32']
    per_script = {
        'pretrain': [f'train_file=[{r}/annotation/coco_karpathy_train.json, {r}/annotation/pretrain_noisy.json]',
                     images, 'batch_size=8', 'queue_size=16', 'warmup_steps=2', 'max_epoch=1'],
        'train_caption': [images, ann, f'coco_gt_root={r}/annotation/coco_gt', 'batch_size=8', 'max_length=8',
                          'num_beams=2', 'max_epoch=1'],
        'eval_nocaps': [images, ann, 'batch_size=8', 'max_length=8', 'num_beams=2'],
        'train_retrieval': [images, ann, 'batch_size_train=8', 'batch_size_test=8', 'queue_size=16', 'k_test=4',
                            'max_epoch=1'],
        'train_vqa': [f'vqa_root={r}/images', ann, 'batch_size_train=8', 'batch_size_test=8', 'k_test=4',
                      'max_epoch=1'],
        'train_nlvr': [images, ann, 'batch_size_train=4', 'batch_size_test=4', 'max_epoch=1'],
        'eval_retrieval_video': [f'video_root={r}/videos', ann, 'batch_size=2', 'k_test=4', 'num_frm_test=2'],
    }
    return base + per_script[script]


CONFIGS = {'pretrain': 'pretrain', 'train_caption': 'caption', 'eval_nocaps': 'nocaps',
           'train_retrieval': 'retrieval', 'train_vqa': 'vqa', 'train_nlvr': 'nlvr',
           'eval_retrieval_video': 'retrieval_video'}

EXPECTED_FILES = {
    'pretrain': ['checkpoint_00.pth', 'checkpoint_last.pth', 'log.txt', 'train_log.jsonl'],
    'train_caption': ['checkpoint_best.pth', 'checkpoint_last.pth', 'log.txt', 'result/val_epoch0.json',
                      'result/test_epoch0.json'],
    'eval_nocaps': ['result/val.json', 'result/test.json', 'evaluate.txt'],
    'train_retrieval': ['checkpoint_best.pth', 'checkpoint_last.pth', 'log.txt'],
    'train_vqa': ['checkpoint_00.pth', 'result/vqa_result.json', 'log.txt'],
    'train_nlvr': ['checkpoint_best.pth', 'log.txt'],
    'eval_retrieval_video': ['test_result.txt'],
}
EXPECTED_METRICS = {  # keys of the last log line (log.txt / evaluate.txt / test_result.txt)
    'pretrain': ['train_loss_ita', 'train_loss_itm', 'train_loss_lm', 'epoch'],
    'train_caption': ['train_loss', 'val_CIDEr', 'val_Bleu_4', 'test_CIDEr', 'best_epoch'],
    'train_retrieval': ['train_loss_ita', 'train_loss_itm', 'val_r_mean', 'test_txt_r1', 'test_img_r1'],
    'train_vqa': ['test_vqa_accuracy'],
    'train_nlvr': ['train_loss', 'val_acc', 'test_acc', 'best_epoch'],
    'eval_retrieval_video': ['txt_r1', 'vid_r1', 'vid_mdR', 'r_mean'],
}
LOG_FILE = {'eval_nocaps': 'evaluate.txt', 'eval_retrieval_video': 'test_result.txt'}


def argv(script: str, toy: Path, out: Path, *extra: str) -> list[str]:
    return ['--config', str(ROOT / 'configs' / 'toy' / f'{CONFIGS[script]}.yaml'), '--output_dir', str(out),
            '--device', 'cpu', *extra, '--options', *script_options(script, toy)]


def check_outputs(script: str, out: Path, expected_samples: dict | None = None) -> dict:
    for name in EXPECTED_FILES[script]:
        assert (out / name).is_file(), f'{script}: {name} not written'
    assert (out / 'config.yaml').is_file()
    for ck in out.glob('checkpoint_*.pth'):
        state = torch.load(ck, weights_only=True)
        assert {'model', 'optimizer', 'config', 'epoch'} <= set(state)
    lines = (out / LOG_FILE.get(script, 'log.txt')).read_text().splitlines()
    last = json.loads(lines[-1])
    for key in EXPECTED_METRICS.get(script, []):
        assert key in last, f'{script}: {key} missing from {last}'
    return last


@pytest.mark.parametrize('script', sorted(CONFIGS))
def test_script_runs_in_process(script, toy, tmp_path):
    module = importlib.import_module(script)
    module.main(argv(script, toy, tmp_path))
    check_outputs(script, tmp_path)
    if script == 'train_caption':  # every evaluation image captioned once
        assert len(json.loads((tmp_path / 'result/val_epoch0.json').read_text())) == 8


def test_cuda_graph_config_key_gives_the_same_captions(toy, tmp_path, monkeypatch):
    """``cuda_graph: true`` (the static decode step; eager off the GPU) changes the speed, never the captions."""
    import eval_nocaps
    from models import generation
    graphed = []
    init = generation._GraphedDecoder.__init__
    monkeypatch.setattr(generation._GraphedDecoder, '__init__',
                        lambda self, *a, **kw: graphed.append(1) or init(self, *a, **kw))
    files = []
    for flag in ('False', 'True'):
        out = tmp_path / flag
        eval_nocaps.main(argv('eval_nocaps', toy, out) + [f'cuda_graph={flag}'])
        files.append([json.loads((out / 'result' / f'{split}.json').read_text()) for split in ('val', 'test')])
        assert bool(graphed) == (flag == 'True')   # the key reaches the decoder
    assert files[0] == files[1] and len(files[0][0]) > 0


def test_compile_config_key_compiles_the_layers_and_trains(toy, tmp_path, monkeypatch):
    """``compile: true`` compiles every ViT block and MED layer before training (dynamo's eager backend here:
    inductor's code generation takes minutes on a CPU); training, evaluation and captioning run through."""

    import train_caption
    from engine import runner
    from models.compile import compile_layers
    from torch._dynamo.utils import counters
    compiled = []
    monkeypatch.setattr(runner, 'compile_layers',
                        lambda model: compiled.append(compile_layers(model, backend='eager')) or compiled[-1])
    torch._dynamo.reset()
    counters.clear()
    try:
        train_caption.main(argv('train_caption', toy, tmp_path) + ['compile=True'])
    finally:
        torch._dynamo.reset()
    assert compiled and compiled[0] > 0
    assert counters['stats']['calls_captured'] > 0 and not counters['graph_break']
    check_outputs('train_caption', tmp_path)


def _torchrun(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / f'{script}.py'), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{script} under torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc


@pytest.mark.parametrize('script', sorted(CONFIGS))
def test_script_runs_under_torchrun_with_two_processes(script, toy, tmp_path):
    proc = _torchrun(script, argv(script, toy, tmp_path))
    assert 'distributed init (rank 0/2, gloo)' in proc.stdout + proc.stderr
    check_outputs(script, tmp_path)
    if script == 'train_caption':  # distributed-sampler padding removed: each image once
        ids = [r['image_id'] for r in json.loads((tmp_path / 'result/val_epoch0.json').read_text())]
        assert len(ids) == len(set(ids)) == 8
    if script == 'train_vqa':
        answers = json.loads((tmp_path / 'result/vqa_result.json').read_text())
        assert len({a['question_id'] for a in answers}) == len(answers)


def test_graphed_caption_training_step_trains_like_the_eager_one(toy, tmp_path):
    """train_caption.py with cuda_graph: true (captions padded to 40 tokens; on the CPU the two graph parts run
    eagerly) and accumulation: the eager run's training loss; an empty cuda_graph keeps the eager step."""
    import train_caption
    torch.set_num_threads(1)
    opts = ['accum_steps=2', 'clip_grad=1.0']
    eager = train_caption.main(argv('train_caption', toy, tmp_path / 'eager') + opts)
    graphed = train_caption.main(argv('train_caption', toy, tmp_path / 'graphed') + opts + ['cuda_graph=True'])
    assert graphed['train_loss'] == pytest.approx(eager['train_loss'], rel=1e-4)
    # the graphed run's optimizer was the capturable one (LR on the device), the eager run's not
    lrs = [torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True)['optimizer']['param_groups'][0]['lr']
           for d in ('eager', 'graphed')]
    assert not isinstance(lrs[0], torch.Tensor) and isinstance(lrs[1], torch.Tensor)


def test_graphed_pretraining_under_torchrun_trains_like_ddp(toy, tmp_path):
    """``cuda_graph: true`` with 2 processes (no DDP wrapper: one all-reduce of the flat gradient buffer between
    the step's two parts, rank 0's weights broadcast first; the graph parts run eagerly on the CPU) and
    accumulation: the epoch losses and weights of the eager DDP run."""
    opts = ['accum_steps=2', 'clip_grad=1.0']
    _torchrun('pretrain', argv('pretrain', toy, tmp_path / 'ddp') + opts)
    proc = _torchrun('pretrain', argv('pretrain', toy, tmp_path / 'graph') + opts + ['cuda_graph=True'])
    assert 'gradients averaged over ranks' not in proc.stdout  # printed on a GPU only; here: eager buffers
    logs = [json.loads((tmp_path / d / 'log.txt').read_text().splitlines()[-1]) for d in ('ddp', 'graph')]
    for key in ('train_loss_ita', 'train_loss_itm', 'train_loss_lm'):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-4), key
    a, b = (torch.load(tmp_path / d / 'checkpoint_00.pth', weights_only=True)['model'] for d in ('ddp', 'graph'))
    for k in a:
        if not k.endswith(('key.bias', 'attn.qkv.bias')):  # rounding-noise gradients (see test_cuda_graph.py)
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


class _Stop(Exception):
    pass


def test_mid_epoch_resume_point_of_one_process_continues_under_two(toy, tmp_path, monkeypatch):
    """A resume point saved by 1 process after 2 of its 12 steps (16 samples) continues under torchrun with 2
    processes at step 1 of their 6: the per-rank step count was reused as is, which skipped other samples, or
    ran past the new epoch's end and left the ranks waiting in different collectives."""
    import pretrain
    from engine.lock import release_output_dir
    from engine.runner import Run
    save = Run.save_resume_point

    def save_then_stop(self, epoch, resume):
        save(self, epoch, resume)
        if resume[1]:  # a mid-epoch point: stop as a killed run would
            raise _Stop

    monkeypatch.setattr(Run, 'save_resume_point', save_then_stop)
    out = tmp_path / 'out'
    with pytest.raises(_Stop):
        pretrain.main(argv('pretrain', toy, out) + ['save_every_steps=2'])
    release_output_dir(out)  # as the killed process's end would
    saved = torch.load(out / 'checkpoint_last.pth', weights_only=True)['resume']
    assert (saved['epoch'], saved['step']) == (0, 2)
    assert saved['progress']['epoch_totals']['samples'] == 16
    proc = _torchrun('pretrain', argv('pretrain', toy, out, '--resume', 'auto') + ['save_every_steps=2'],
                     timeout=300)
    assert 'the epoch continues at step 1 of 6' in proc.stdout
    epochs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [e['epoch'] for e in epochs] == [0] and all(v == v for v in epochs[0].values())


def test_second_run_into_the_same_output_dir_keeps_the_first_runs_checkpoints(toy, tmp_path):
    """The same command run twice replaced checkpoint_best.pth and mixed both runs' epochs in log.txt; it now stops
    before any work unless told to continue (--resume) or replace (--overwrite) the earlier run."""
    from engine.config import ConfigError
    import train_retrieval
    out = tmp_path / 'out'
    train_retrieval.main(argv('train_retrieval', toy, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r'holds checkpoints of an earlier run \(checkpoint_best\.pth, '
                                          r'checkpoint_last\.pth\): --resume auto continues it, --overwrite'):
        train_retrieval.main(argv('train_retrieval', toy, out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    train_retrieval.main(argv('train_retrieval', toy, out, '--evaluate'))   # evaluating writes no checkpoint
    train_retrieval.main(argv('train_retrieval', toy, out, '--overwrite'))
    assert len((out / 'log.txt').read_text().splitlines()) == 1             # the replaced run's log starts anew


def test_mid_epoch_start_step_counts_samples_across_world_sizes():
    from engine.runner import mid_epoch_start_step
    saved = {'epoch': 3, 'step': 6, 'samples': 6 * 8 * 2, 'world_size': 2, 'batch_size': 8}
    assert mid_epoch_start_step(saved, 8, 2, 50) == 6          # same layout: the saved step
    assert mid_epoch_start_step(saved, 8, 1, 100) == 12        # half the ranks: twice the steps
    assert mid_epoch_start_step(saved, 8, 4, 25) == 3
    assert mid_epoch_start_step(saved, 16, 4, 12) == 1         # 96 samples, 64 per step: 32 seen again
    assert mid_epoch_start_step(saved, 8, 16, 2) == 0
    assert mid_epoch_start_step({'epoch': 0, 'step': 5}, 8, 4, 9) == 5   # saved before samples were recorded
    assert mid_epoch_start_step({**saved, 'samples': 10 ** 6}, 8, 1, 100) == 100  # never past the epoch's end


def test_evaluate_under_torchrun_with_a_split_that_does_not_divide_by_the_ranks(tmp_path):
    """``--evaluate`` on two ranks ends cleanly on both (rank 0 used to leave the loop early and tear the process
    group down under rank 1's barrier), and the 7 images padded to 8 by the sampler are each captioned once."""
    odd = ensure_toy_dataset(tmp_path / 'toy', n_train=8, n_val=7, n_test=7, n_web=4, n_videos=0)
    out = tmp_path / 'out'
    _torchrun('train_caption', argv('train_caption', odd, out) + ['--evaluate'])
    assert (out / 'evaluate.txt').is_file()
    for split in ('val', 'test'):
        ids = [r['image_id'] for r in json.loads((out / f'result/{split}_epoch0.json').read_text())]
        assert len(ids) == len(set(ids)) == 7


def test_unknown_config_key_fails_before_any_work(toy, tmp_path):
    from engine.config import ConfigError
    import train_caption
    with pytest.raises(ConfigError, match=r"caption\.yaml.*'batch_sise'"):
        train_caption.main(argv('train_caption', toy, tmp_path) + ['batch_sise=8'])
    assert not (tmp_path / 'config.yaml').exists()


def test_missing_checkpoint_file_fails_before_any_output(toy, tmp_path):
    """A mistyped ``pretrained`` or ``--resume`` path is named before the output folder is made."""
    from engine.config import ConfigError
    import train_retrieval
    out = tmp_path / 'out'
    with pytest.raises(ConfigError, match=r"^--options \(config .*retrieval\.yaml\): pretrained: no such checkpoint file '.*nope\.pth'"):
        train_retrieval.main(argv('train_retrieval', toy, out) + [f'pretrained={tmp_path}/nope.pth'])
    with pytest.raises(ConfigError, match=r"--resume: no such checkpoint file"):
        train_retrieval.main(argv('train_retrieval', toy, out, '--resume', str(tmp_path / 'gone.pth')))
    assert not out.exists()


def test_caption_ground_truth_is_downloaded_when_missing_and_checked_before_training(toy, tmp_path, monkeypatch):
    """The original's coco_caption_eval downloads coco_karpathy_{val,test}_gt.json into coco_gt_root; a run
    must not train an epoch and then fail on a missing file or an unset key."""
    import data.utils
    import train_caption
    calls = []

    def fake_download(url, root):
        calls.append((url, root))
        name = url.rsplit('/', 1)[1]
        (Path(root) / name).write_text((toy / 'annotation' / 'coco_gt' / name).read_text())

    monkeypatch.setattr(data.utils, 'download_url', fake_download)
    gt_root = tmp_path / 'coco_gt'
    config = train_caption.CaptionConfig(coco_gt_root=str(gt_root))
    path = train_caption.caption_gt_file(config, 'val')
    assert json.loads(Path(path).read_text())['annotations']
    base = 'https://storage.googleapis.com/sfr-vision-language-research/datasets/'
    assert calls == [(base + 'coco_karpathy_val_gt.json', str(gt_root))]
    train_caption.caption_gt_file(config, 'val')                       # present now: not fetched again
    assert len(calls) == 1
    with pytest.raises(ValueError, match='coco_gt_root'):
        train_caption.caption_gt_file(train_caption.CaptionConfig(), 'test')
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match='coco_gt_root'):                # before any training step
        train_caption.main(argv('train_caption', toy, out) + ['coco_gt_root='])
    assert not list(out.glob('checkpoint_*.pth'))


class _ReachedTheLoaders(Exception):
    pass


@pytest.mark.parametrize('script', sorted(CONFIGS))
def test_readme_toy_command_finds_its_data_on_a_fresh_checkout(script, tmp_path, monkeypatch):
    """The README's toy commands, run in a folder without ``output/``: the script writes the toy dataset before
    it looks for any file of it (train_caption once checked its ground truth first, found it missing and tried to
    download it). Stops when the data loaders are built; nothing may be downloaded."""
    import data.utils
    from engine.runner import Run

    def no_download(url, root):
        raise AssertionError(f'{script} tried to download {url} into {root}')

    def stop(self, *args, **kwargs):
        raise _ReachedTheLoaders

    monkeypatch.setattr(data.utils, 'download_url', no_download)
    monkeypatch.setattr(Run, 'loaders', stop)
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    with pytest.raises(_ReachedTheLoaders):
        module.main(['--config', str(ROOT / 'configs' / 'toy' / f'{CONFIGS[script]}.yaml'),
                     '--output_dir', 'output/run', '--device', 'cpu', '--options', 'num_workers=0'])
    assert (tmp_path / 'output' / 'toy_data').is_dir()
