"""Engine units: configs, distributed env, LR schedules, the training loop, checkpoints and resume state."""
from __future__ import annotations

import importlib
import math
import os
import pickle
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import distributed as du
from engine.checkpoint_io import (NonFiniteWeightsError, atomic_torch_save, capture_rng_state, find_latest_checkpoint,
                                  load_training_state, restore_rng_state, save_checkpoint)
from engine.config import CommonConfig, ConfigError, load_config, save_config
from engine.loop import EpochPlan, NonFiniteLossError, ResumableSampler, StepPlan, train_one_epoch
from engine.optim import cosine_lr, create_optimizer, step_lr, warmup_lr
from models.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------- configs
ORIGINAL_CONFIGS = {  # every original YAML, unchanged, loads into its script's schema
    'pretrain.yaml': ('pretrain', 'PretrainConfig'),
    'caption_coco.yaml': ('train_caption', 'CaptionConfig'),
    'nocaps.yaml': ('eval_nocaps', 'NoCapsConfig'),
    'retrieval_coco.yaml': ('train_retrieval', 'RetrievalConfig'),
    'retrieval_flickr.yaml': ('train_retrieval', 'RetrievalConfig'),
    'retrieval_msrvtt.yaml': ('eval_retrieval_video', 'VideoRetrievalConfig'),
    'vqa.yaml': ('train_vqa', 'VQAConfig'),
    'nlvr.yaml': ('train_nlvr', 'NLVRConfig'),
}
TOY_CONFIGS = {'pretrain.yaml': 'pretrain', 'pretrain_shards.yaml': 'pretrain', 'caption.yaml': 'train_caption',
               'nocaps.yaml': 'eval_nocaps',
               'retrieval.yaml': 'train_retrieval', 'retrieval_video.yaml': 'eval_retrieval_video',
               'vqa.yaml': 'train_vqa', 'nlvr.yaml': 'train_nlvr'}


def _schema(module: str, name: str | None = None):
    mod = importlib.import_module(module)
    if name is None:
        name = next(n for n in dir(mod) if n.endswith('Config') and n != 'CommonConfig')
    return getattr(mod, name)


@pytest.mark.parametrize('filename', sorted(ORIGINAL_CONFIGS))
def test_original_configs_load_unchanged(filename):
    module, schema = ORIGINAL_CONFIGS[filename]
    config = load_config(ROOT / 'configs' / filename, _schema(module, schema))
    assert config.image_size in (224, 384, 480)
    assert isinstance(config.init_lr if hasattr(config, 'init_lr') else 0.0, float)  # '1e-5' parsed as a float


@pytest.mark.parametrize('filename', sorted(TOY_CONFIGS))
def test_toy_configs_load(filename):
    config = load_config(ROOT / 'configs' / 'toy' / filename, _schema(TOY_CONFIGS[filename]))
    assert config.toy_root and config.vit == 'tiny'


@dataclass
class _Schema(CommonConfig):
    init_lr: float = 1e-5
    batch_size: int = 32
    vit: object = 'base'
    train_file: list = None
    use_x: bool = False


def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    return path


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    path = _yaml(tmp_path, 'init_lr: 1e-4\nbatch_sise: 8\n')
    with pytest.raises(ConfigError, match=r"c\.yaml.*'batch_sise'.*did you mean 'batch_size' for 'batch_sise'\?"):
        load_config(path, _Schema)
    with pytest.raises(ConfigError, match=r"^--options \(config .*c\.yaml\): unknown config key\(s\) \['nope'\]"):
        load_config(_yaml(tmp_path, 'init_lr: 1e-4\n'), _Schema, ['nope=3'])
    with pytest.raises(ConfigError, match=r"^--options .*'batch_size' must be int"):  # the value came from there
        load_config(_yaml(tmp_path, 'init_lr: 1e-4\n'), _Schema, ['batch_size=many'])


def test_wrong_types_and_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'batch_size' must be int"):
        load_config(_yaml(tmp_path, 'batch_size: many\n'), _Schema)
    with pytest.raises(ConfigError, match=r"'use_x' must be bool"):
        load_config(_yaml(tmp_path, 'use_x: 3\n'), _Schema)
    with pytest.raises(ConfigError, match='not found'):
        load_config(tmp_path / 'missing.yaml', _Schema)
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_config(_yaml(tmp_path, 'a: [1, 2\n'), _Schema)
    with pytest.raises(ConfigError, match='mapping'):
        load_config(_yaml(tmp_path, '- 1\n- 2\n'), _Schema)
    with pytest.raises(ConfigError, match='KEY=VALUE'):
        load_config(_yaml(tmp_path, ''), _Schema, ['batch_size'])


@pytest.mark.parametrize('option, message', [
    ('batch_size=0', "'batch_size' must be >= 1, got 0"), ('log_every=0', "'log_every' must be >= 1"),
    ('init_lr=-1e-4', "'init_lr' must be >= 0.0"), ('num_workers=-1', "'num_workers' must be >= 0"),
])
def test_values_out_of_range_are_errors_naming_key_and_source(tmp_path, option, message):
    """A zero batch size or log interval would fail at the first step; caught when the config is read."""
    with pytest.raises(ConfigError, match=r'^--options \(config .*c\.yaml\): key ' + re.escape(message)):
        load_config(_yaml(tmp_path, 'init_lr: 1e-4\n'), _Schema, [option])
    key, value = option.split('=')
    with pytest.raises(ConfigError, match=r'c\.yaml: key ' + re.escape(message)):
        load_config(_yaml(tmp_path, f'{key}: {value}\n'), _Schema)


@pytest.mark.parametrize('script, option', [('train_retrieval', 'k_test=0'), ('train_caption', 'max_epoch=-1'),
                                            ('train_caption', 'image_size=-16'), ('pretrain', 'warmup_steps=-1')])
def test_task_configs_refuse_values_that_would_fail_late_or_do_nothing(script, option):
    config_file = {'train_retrieval': 'retrieval', 'train_caption': 'caption', 'pretrain': 'pretrain'}[script]
    with pytest.raises(ConfigError, match=f"'{option.split('=')[0]}' must be >="):
        load_config(ROOT / 'configs' / 'toy' / f'{config_file}.yaml', _schema(script), [option])


def test_options_override_with_yaml_values_and_dotted_keys(tmp_path):
    path = _yaml(tmp_path, "init_lr: 1e-5\nvit: {name: base, drop_path_rate: 0.0}\n")
    config = load_config(path, _Schema, ['batch_size=8', 'init_lr=2', 'vit.drop_path_rate=0.1',
                                         "train_file=[a.json, b.json]", 'use_x=true'])
    assert config.batch_size == 8 and config.init_lr == 2.0 and isinstance(config.init_lr, float)
    assert config.vit == {'name': 'base', 'drop_path_rate': 0.1}
    assert config.train_file == ['a.json', 'b.json'] and config.use_x is True
    with pytest.raises(ConfigError, match='not a mapping'):
        load_config(_yaml(tmp_path, 'vit: base\n'), _Schema, ['vit.depth=3'])


def test_resolved_config_is_saved_and_reloads_identically(tmp_path):
    config = load_config(_yaml(tmp_path, 'init_lr: 3e-4\ntrain_file: [x.json]\n'), _Schema, ['batch_size=4'])
    out = save_config(config, tmp_path / 'run')
    assert load_config(out, _Schema) == config
    assert config['batch_size'] == 4 and 'init_lr' in config and config.get('absent', 7) == 7


# --------------------------------------------------------------------------------------- distributed
def test_dist_env_from_torchrun_slurm_or_nothing():
    assert du.read_dist_env({'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'}) == \
        {'rank': 3, 'world_size': 8, 'local_rank': 1}
    # the original left world_size at 1 under SLURM (multi-node jobs hung); it must be the srun step's size
    env = du.read_dist_env({'SLURM_PROCID': '5', 'SLURM_NTASKS': '16', 'SLURM_STEP_NUM_TASKS': '16',
                            'SLURM_LOCALID': '1'})
    assert (env['rank'], env['world_size'], env['local_rank']) == (5, 16, 1)
    assert du.read_dist_env({}) == {}
    # a batch script's own shell (plain `python`, no srun): one process, not a group of 8 waiting forever
    assert du.read_dist_env({'SLURM_PROCID': '0', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '0'}) == {}


@pytest.mark.parametrize('env', [{'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '3'},
                                 {'SLURM_PROCID': '11', 'SLURM_STEP_NUM_TASKS': '16', 'SLURM_LOCALID': '3'}])
def test_each_local_process_gets_its_own_gpu_as_the_current_device(monkeypatch, env):
    """CapFilt starts no process group; under srun it used to put every rank of a node on GPU 0."""
    from engine.runner import resolve_device
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_LOCALID'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    current = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    assert resolve_device('cuda') == torch.device('cuda', 3) and current == [torch.device('cuda', 3)]
    assert resolve_device('cpu') == torch.device('cpu')


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS'):
        monkeypatch.delenv(key, raising=False)

    class Args:
        distributed, dist_url, device = True, 'env://', 'cpu'

    args = Args()
    du.init_distributed_mode(args)
    assert args.distributed is False and args.world_size == 1
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
    du.barrier()  # the original crashed here without a process group
    t = torch.arange(3.0, requires_grad=True)
    assert du.all_gather_with_grad(t) is t and torch.equal(du.all_gather_no_grad(t), t)


# ----------------------------------------------------------------------------------------- schedules
def test_lr_schedules_match_the_original_formulas():
    caption = [cosine_lr(e, 5, 1e-5, 0.0) for e in range(5)]
    assert caption == pytest.approx([1e-5, 9.045e-6, 6.545e-6, 3.455e-6, 9.55e-7], rel=1e-3)
    assert warmup_lr(0, 3000, 1e-6, 3e-4) == 1e-6 and warmup_lr(3000, 3000, 1e-6, 3e-4) == 3e-4
    assert warmup_lr(1500, 3000, 1e-6, 3e-4) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert step_lr(2, 3e-4, 1e-6, 0.9) == pytest.approx(3e-4 * 0.81) and step_lr(200, 3e-4, 1e-6, 0.9) == 1e-6


def test_optimizer_is_the_originals_adamw_over_all_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = create_optimizer(model, _Schema(init_lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert len(group['params']) == 4 and group['weight_decay'] == 0.05 and group['betas'] == (0.9, 0.999)


# --------------------------------------------------------------------------------------------- loop
class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _mse_step(model, batch, step):
    x, y = batch
    return {'loss': ((model(x) - y) ** 2).mean()}


def _train(batch_size, accum, lr_fn=lambda s: 0.1, step_fn=_mse_step, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_Data(), batch_size=batch_size, shuffle=False)
    stats = train_one_epoch(model, loader, StepPlan(step_fn, opt, lr_fn, accum_steps=accum, **kw), EpochPlan(0),
                            torch.device('cpu'))
    return model, opt, stats


def test_accumulation_equals_one_large_batch():
    big, _, _ = _train(batch_size=8, accum=1)
    small, _, _ = _train(batch_size=4, accum=2)
    torch.testing.assert_close(small.weight, big.weight, rtol=1e-5, atol=1e-6)


def test_a_short_last_window_averages_over_its_batches_and_lr_counts_updates():
    """16 samples in batches of 2 with accum_steps=3: updates over 6, 6 and 4 samples, each the mean over its
    own samples (the last one used to be divided by 3 as well), and lr_fn sees update indices 0, 0, 0, 1, ..."""
    seen = []
    model, _, _ = _train(batch_size=2, accum=3, lr_fn=lambda s: seen.append(s) or 0.1)
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2]
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = _Data()
    for lo, hi in [(0, 6), (6, 12), (12, 16)]:
        ((ref(data.x[lo:hi]) - data.y[lo:hi]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_lr_is_set_every_step_and_reported():
    seen = []

    def step_fn(model, batch, step):
        return _mse_step(model, batch, step)

    model, opt, stats = _train(batch_size=4, accum=1, lr_fn=lambda s: seen.append(s) or 0.01 * (s + 1),
                               step_fn=step_fn)
    assert seen == [0, 1, 2, 3] and opt.param_groups[0]['lr'] == pytest.approx(0.04)
    assert stats['lr'] == pytest.approx(0.04) and stats['loss'] > 0


def test_clipping_bounds_the_update():
    free, _, _ = _train(batch_size=16, accum=1, lr_fn=lambda s: 1.0)
    clipped, _, _ = _train(batch_size=16, accum=1, lr_fn=lambda s: 1.0, clip_grad=1e-3)
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 1)
    moved = lambda m: float(torch.cat([(m.weight - start.weight).flatten(), m.bias - start.bias]).detach().norm())  # noqa: E731
    assert moved(clipped) == pytest.approx(1e-3, rel=1e-3) and moved(free) > 1e-2


def test_non_finite_loss_stops_before_the_update_naming_the_step(tmp_path):
    saved = []

    def step_fn(model, batch, step):
        out = _mse_step(model, batch, step)
        return {'loss': out['loss'] * (float('nan') if step == 2 else 1.0), 'aux': out['loss'].detach()}

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_Data(), batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3 step 2: \{'loss': nan\}"):
        train_one_epoch(model, loader, StepPlan(step_fn, opt, lambda s: 0.1),
                        EpochPlan(3, save_every_steps=1, save_fn=lambda step, totals: saved.append(step)),
                        torch.device('cpu'))
    assert saved == [1, 2]  # checkpoints only after the good steps 0 and 1, none after the NaN
    assert torch.isfinite(model.weight).all()


def test_bf16_autocast_runs_on_cpu():
    _, _, stats = _train(batch_size=4, accum=1, precision='bf16')
    assert math.isfinite(stats['loss'])
    with pytest.raises(ValueError, match='amp must be one of'):
        _train(batch_size=4, accum=1, precision='fp8')


def test_resumable_sampler_skips_without_loading():
    sampler = ResumableSampler(torch.utils.data.DistributedSampler(range(10), num_replicas=1, rank=0, seed=1))
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.start_at(4)
    assert list(sampler) == full[4:] and len(sampler) == 10
    assert list(sampler) == full  # the skip applies to one iteration only


def test_loop_resumes_mid_epoch_to_the_same_weights():
    def run(stop_at=None, resume=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sampler = ResumableSampler(torch.utils.data.DistributedSampler(_Data(), num_replicas=1, rank=0, seed=5))
        loader = torch.utils.data.DataLoader(_Data(), batch_size=4, sampler=sampler)
        states = {}

        def save(step, totals):
            states[step] = ({k: v.clone() for k, v in model.state_dict().items()}, pickle.dumps(opt.state_dict()),
                            totals)
            if step == stop_at:
                raise KeyboardInterrupt

        start, totals = 0, None
        if resume is not None:
            step, (weights, opt_state, totals) = resume
            model.load_state_dict(weights)
            opt.load_state_dict(pickle.loads(opt_state))
            start = step
        try:
            stats = train_one_epoch(model, loader, StepPlan(_mse_step, opt, lambda s: 0.1),
                                    EpochPlan(0, start_step=start, start_totals=totals, save_every_steps=1,
                                              save_fn=save), torch.device('cpu'))
        except KeyboardInterrupt:
            return None, states
        return (model, stats), states

    (full, full_stats), _ = run()
    _, states = run(stop_at=2)
    assert states[2][2]['count'] == 2
    (resumed, stats), _ = run(resume=(2, states[2]))
    torch.testing.assert_close(resumed.weight, full.weight, rtol=0, atol=0)
    assert stats == full_stats  # the epoch's mean loss covers the steps before the resume too


# -------------------------------------------------------------------------------------- checkpoints
def _ckpt(tmp_path, name='ck.pth', epoch=1, resume=(1, 7)):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / name, model, opt, {'init_lr': 1e-3}, epoch, *resume)
    return path, model, opt


def test_checkpoint_has_the_original_layout_and_resume_position(tmp_path):
    path, model, _ = _ckpt(tmp_path)
    ck = torch.load(path, weights_only=True)
    assert {'model', 'optimizer', 'config', 'epoch'} <= set(ck) and ck['epoch'] == 1
    fresh = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_training_state(path, fresh, opt) == (1, 7)
    torch.testing.assert_close(fresh.weight, model.weight)
    assert opt.state_dict()['state'][0]['step'] == 1


def test_original_checkpoint_resumes_at_next_epoch(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'config': {}, 'epoch': 4}, tmp_path / 'orig.pth')
    assert load_training_state(tmp_path / 'orig.pth', torch.nn.Linear(3, 2), None) == (5, 0)


def test_mismatched_or_malicious_checkpoints_are_refused(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    with pytest.raises(CheckpointError, match='does not match the model'):
        load_training_state(path, torch.nn.Linear(3, 5), None)

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    torch.save({'model': Evil(), 'epoch': 0}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='refused to load'):
        load_training_state(tmp_path / 'evil.pth', torch.nn.Linear(3, 2), None)


def test_empty_truncated_or_foreign_checkpoint_files_say_what_they_are(tmp_path):
    from models.checkpoint import read_checkpoint
    path, _, _ = _ckpt(tmp_path)
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'half.pth').write_bytes(Path(path).read_bytes()[:200])
    (tmp_path / 'config.pth').write_text('batch_size: 8\n')
    with pytest.raises(CheckpointError, match=r'empty\.pth: the file is empty \(0 bytes'):
        read_checkpoint(str(tmp_path / 'empty.pth'))
    with pytest.raises(CheckpointError, match=r'half\.pth: not a readable PyTorch checkpoint \(\d+ bytes; '
                                              r'torch\.load: .*truncated, or not a torch\.save file') as e:
        read_checkpoint(str(tmp_path / 'half.pth'))
    assert e.value.__cause__ is None and e.value.__suppress_context__   # no torch-internal traceback
    with pytest.raises(CheckpointError, match=r'config\.pth: not a PyTorch checkpoint \(\d+ bytes'):
        read_checkpoint(str(tmp_path / 'config.pth'))


def test_random_bytes_are_not_a_checkpoint_and_the_unsafe_flag_is_never_suggested(tmp_path):
    """Random bytes were reported as 'pickled Python objects that would run code', quoting torch's advice to load
    with weights_only=False; a damaged pickle is also not 'code'."""
    from models.checkpoint import read_checkpoint
    rng = np.random.default_rng(0)
    (tmp_path / 'random.pth').write_bytes(rng.bytes(3000))
    (tmp_path / 'bad_pickle.pth').write_bytes(b'\x80\x02' + rng.bytes(3000))
    for name in ('random.pth', 'bad_pickle.pth'):
        with pytest.raises(CheckpointError, match=rf'{name}: not a (readable )?PyTorch checkpoint') as e:
            read_checkpoint(str(tmp_path / name))
        assert 'weights_only' not in str(e.value) and 'run code' not in str(e.value)


def test_hf_folders_and_safetensors_files_get_the_same_clear_refusals(tmp_path):
    """An HF folder's pytorch_model.bin holding pickled code, a truncated one, and a garbage .safetensors file
    were refused with torch's / safetensors' raw errors, which name no file (one even advised weights_only=False)."""
    from models.checkpoint import read_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    evil, torn = tmp_path / 'hf_evil', tmp_path / 'hf_torn'
    evil.mkdir(), torn.mkdir()
    torch.save({'w': Evil()}, evil / 'pytorch_model.bin')
    torch.save({'w': torch.zeros(64)}, tmp_path / 'whole.bin')
    (torn / 'pytorch_model.bin').write_bytes((tmp_path / 'whole.bin').read_bytes()[:300])
    (tmp_path / 'junk.safetensors').write_bytes(b'\xff' * 64)
    with pytest.raises(CheckpointError, match=r'hf_evil/pytorch_model\.bin: refused to load') as e:
        read_checkpoint(str(evil))
    assert 'weights_only=False' not in str(e.value)
    with pytest.raises(CheckpointError, match=r'hf_torn/pytorch_model\.bin: not a readable PyTorch checkpoint'):
        read_checkpoint(str(torn))
    with pytest.raises(CheckpointError, match=r'junk\.safetensors: not a readable HF checkpoint \(\w*Error'):
        read_checkpoint(str(tmp_path / 'junk.safetensors'))
    with pytest.raises(CheckpointError, match=r'not a readable HF checkpoint .*no model\.safetensors'):
        read_checkpoint(str(tmp_path))   # a folder with none of HF's file names


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path, model, _ = _ckpt(tmp_path, name='checkpoint_last.pth')
    before = torch.load(path, weights_only=True)['model']

    def torn_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({'model': {}}, path)
    monkeypatch.undo()
    after = torch.load(path, weights_only=True)['model']
    torch.testing.assert_close(after, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint_last.pth']  # no temp file left
    assert find_latest_checkpoint(tmp_path) == path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_save(tmp_path):
    from engine.atomic import _HOST
    path, _, _ = _ckpt(tmp_path, name='checkpoint_last.pth')
    dead = f'.checkpoint_last.pth.{_HOST}.{_dead_pid()}.0a0a0a0a.tmp'
    (tmp_path / dead).write_bytes(b'x' * 1000)                                  # SIGKILL mid-write leaves this
    (tmp_path / f'.other.pth.{_HOST}.{_dead_pid()}.0b0b0b0b.tmp').write_bytes(b'x')  # another file's: not touched
    _ckpt(tmp_path, name='checkpoint_last.pth')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in tmp_path.glob('.other*')]
                                                                + ['checkpoint_last.pth'])


def test_a_live_writers_temporary_file_is_never_removed_by_another_writer(tmp_path):
    """Two processes writing the same checkpoint: the old code named temp files by pid and deleted every
    ``.checkpoint_last.pth.tmp*`` before writing, so one writer's rename failed with FileNotFoundError."""
    from engine.atomic import atomic_write, temp_path
    path = tmp_path / 'checkpoint_last.pth'
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        from engine import atomic
        theirs = tmp_path / f'.checkpoint_last.pth.{atomic._HOST}.{live.pid}.0c0c0c0c.tmp'
        theirs.write_bytes(b'half of their checkpoint')
        atomic_torch_save({'model': {}}, path)
        assert theirs.exists() and path.exists()
        assert temp_path(path) != temp_path(path)  # every write its own name, even in one process
        with pytest.raises(RuntimeError), atomic_write(path) as f:  # a failed write removes only its own file
            f.write(b'x')
            raise RuntimeError
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, path.name])
    finally:
        live.kill()
        live.wait()


def test_weights_that_are_not_finite_never_replace_a_checkpoint(tmp_path):
    """A finite loss can still give an inf gradient and NaN weights; saving them would overwrite the last good
    checkpoint (the run stops a step later on the NaN loss), so the save refuses and names the parameter."""
    path, model, opt = _ckpt(tmp_path, name='checkpoint_last.pth')
    before = path.read_bytes()
    with torch.no_grad():
        model.bias[1] = float('nan')
    with pytest.raises(NonFiniteWeightsError, match=r'checkpoint_last.pth: not written.*first: bias'):
        save_checkpoint(path, model, opt, {}, 2, 2, 5)
    assert path.read_bytes() == before


def test_best_score_survives_resume(tmp_path):
    """``Run.improved`` keeps the best score and epoch in every checkpoint; after ``--resume`` a worse epoch
    is not taken for the best (it used to restart from -1 and overwrite checkpoint_best.pth)."""
    from engine.runner import Run
    run = Run.__new__(Run)       # only the resume-state bookkeeping is exercised
    run.resume_state = {}
    assert run.improved(0.5, 0) and not run.improved(0.4, 1) and run.improved(0.7, 2) and run.best_epoch == 2
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / 'last.pth', model, None, {}, 2, 3, 0, progress=run.resume_state)
    resumed = Run.__new__(Run)
    resumed.resume_state = {}
    load_training_state(tmp_path / 'last.pth', model, None, progress=resumed.resume_state)
    assert resumed.resume_state == {'best': 0.7, 'best_epoch': 2}
    assert not resumed.improved(0.6, 3) and resumed.best_epoch == 2


def test_resume_with_another_world_size_says_what_changes_and_that_pretraining_augmentation_does_not(tmp_path,
                                                                                                    capsys):
    """The message said that augmentation differs after such a resume; pretraining's is seeded per sample now."""
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / 'last.pth', model, None, {}, 0, 0, 2, rng=[capture_rng_state()] * 2)
    load_training_state(tmp_path / 'last.pth', model, None, world_size=1)
    out = capsys.readouterr().out
    assert 'saved with 2 rank(s), resuming with 1' in out and 'dropout, ITM negative sampling' in out
    assert "pretraining's augmentation is seeded per sample and stays the same" in out
    load_training_state(tmp_path / 'last.pth', model, None, world_size=2)   # the same world size: silent
    assert 're-seeded' not in capsys.readouterr().out


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for n in (1, 10, 2):
        (tmp_path / f'checkpoint_{n:02d}.pth').write_bytes(b'')
    assert find_latest_checkpoint(tmp_path).name == 'checkpoint_10.pth'


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(), random.gauss(0, 1)  # a cached second gaussian is part of numpy's and python's state
    atomic_torch_save(capture_rng_state(), tmp_path / 'rng.pth')
    expected = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9), random.gauss(0, 1)
    restore_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def _original_optimizer_state(model, names, lr=3e-5):
    """An AdamW state as the original code saved it: one group over ``names`` (its parameter order), moments
    for the trainable ones, none for frozen momentum copies."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {i: {'step': torch.tensor(7.0), 'exp_avg': torch.randn(shapes[n], generator=g),
                 'exp_avg_sq': torch.rand(shapes[n], generator=g)}
             for i, n in enumerate(names) if '_m.' not in n}
    group = {'lr': lr, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0.05, 'amsgrad': False,
             'params': list(range(len(names)))}
    return {'state': state, 'param_groups': [group]}


@pytest.mark.parametrize('layout', ['original', 'unfused_trainable'])
def test_optimizer_state_of_an_original_run_resumes_into_fused_projections(tmp_path, layout):
    """The original's optimizer held every parameter (momentum copies too) with query/key/value separate; ours
    holds the trainable ones with fused projections. Resuming an original run (or one of ours from before
    the fusion) maps each moment to its place: a fused parameter's moments are its parts' concatenated."""
    from models.blip_retrieval import BLIP_Retrieval
    from models.med import original_parameter_order
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    model = BLIP_Retrieval(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16,
                           queue_size=8)
    # the original parameter order, read independently of the code under test: state-dict keys (original
    # layout and order) without buffers and without repeats of a tied tensor
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    seen, names = set(), []
    for k, v in model.state_dict().items():
        if k not in buffers and (v.data_ptr(), v.shape, v.stride()) not in seen:
            seen.add((v.data_ptr(), v.shape, v.stride()))
            names.append(k)
    assert names == original_parameter_order(model)
    if layout == 'unfused_trainable':
        names = [n for n in names if '_m.' not in n]
    saved = _original_optimizer_state(model, names)
    torch.save({'model': model.state_dict(), 'optimizer': saved, 'config': {}, 'epoch': 2}, tmp_path / 'orig.pth')
    optimizer = create_optimizer(model, _Schema(init_lr=1e-3))
    assert load_training_state(tmp_path / 'orig.pth', model, optimizer) == (3, 0)
    moments = {n: saved['state'][i]['exp_avg'] for i, n in enumerate(names) if i in saved['state']}
    layer = 'text_encoder.encoder.layer.1.'
    qkv = dict(model.named_parameters())[layer + 'attention.self.qkv.weight']
    want = torch.cat([moments[layer + f'attention.self.{p}.weight'] for p in ('query', 'key', 'value')])
    assert torch.equal(optimizer.state[qkv]['exp_avg'], want)
    kv = dict(model.named_parameters())[layer + 'crossattention.self.kv.bias']
    want = torch.cat([moments[layer + f'crossattention.self.{p}.bias'] for p in ('key', 'value')])
    assert torch.equal(optimizer.state[kv]['exp_avg'], want)
    ln = dict(model.named_parameters())[layer + 'output.LayerNorm.weight']
    assert torch.equal(optimizer.state[ln]['exp_avg'], moments[layer + 'output.LayerNorm.weight'])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(optimizer.state) == len(trainable) and optimizer.param_groups[0]['lr'] == 3e-5
    assert float(optimizer.state[qkv]['step']) == 7.0
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()                                   # the loaded state is usable as it is


def test_optimizer_state_of_another_model_is_refused_with_the_counts(tmp_path):
    from models.blip_retrieval import BLIP_Retrieval
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    model = BLIP_Retrieval(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16,
                           queue_size=8)
    saved = _original_optimizer_state(torch.nn.Linear(3, 3), ['weight', 'bias'])
    torch.save({'model': model.state_dict(), 'optimizer': saved, 'config': {}, 'epoch': 2}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='optimizer state does not match: 2 parameters'):
        load_training_state(tmp_path / 'other.pth', model, create_optimizer(model, _Schema(init_lr=1e-3)))


def test_fp16_gradients_are_unscaled_before_clipping():
    """With fp16 the loss is scaled (1024 here; more overflows this toy's fp16 gradients); clipping the scaled
    gradients would move the weights 1024 times less than asked. The clipped update must be the fp32 one."""
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    fp16, _, _ = _train(batch_size=16, accum=1, lr_fn=lambda s: 1.0, clip_grad=1e-3, precision='fp16', scaler=scaler)
    fp32, _, _ = _train(batch_size=16, accum=1, lr_fn=lambda s: 1.0, clip_grad=1e-3)
    torch.testing.assert_close(fp16.weight, fp32.weight, rtol=0, atol=2e-5)
    assert scaler.get_scale() == 2.0 ** 10   # no inf/NaN steps skipped
