"""``parallel: fsdp`` (FSDP2) trains as ``parallel: ddp`` does and writes the same checkpoints; the sharding plan;
the momentum EMA on pinned (shard) parameters; models do not import the engine.

The multi-process tests run ``torchrun --nproc_per_node=2`` with gloo on the CPU (a few toy steps each); the
2-node test starts two ``torchrun --nnodes=2 --rdzv_backend=c10d`` agents on this machine."""
from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.toy import ensure_toy_dataset
from tests.test_scripts import argv
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
from tests.toy_runs import script_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def toy(module_dir) -> Path:
    return ensure_toy_dataset(module_dir('toy'), n_train=16, n_val=8, n_test=8, n_web=16, n_videos=2,
                              video_frames=2)


def _torchrun(script: str, args: list[str], launcher: list[str] | None = None, timeout: int = 600):
    cmd = [sys.executable, '-m', 'torch.distributed.run', *(launcher or ['--standalone', '--nproc_per_node=2']),
           str(ROOT / f'{script}.py'), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(*procs, timeout: int = 600) -> str:
    out = ''
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f'torchrun failed:\n{stdout[-3000:]}\n{stderr[-5000:]}'
        out += stdout + stderr
    return out


def _last_log(out: Path) -> dict:
    return json.loads((out / 'log.txt').read_text().splitlines()[-1])


def _close(a: dict, b: dict, keys: list[str], rel: float = 0.02) -> None:
    for k in keys:
        assert abs(a[k] - b[k]) <= rel * abs(a[k]), f'{k}: ddp {a[k]} vs fsdp {b[k]}'


@pytest.fixture(scope='module')
def pretrain_runs(toy, module_dir) -> dict[str, Path]:
    """The toy pretraining (1 epoch) under DDP and FSDP, 2 processes each."""
    outs = {mode: module_dir(f'pretrain_{mode}') for mode in ('ddp', 'fsdp')}
    for mode, out in outs.items():
        _wait(_torchrun('pretrain', argv('pretrain', toy, out) + OPTIONS[mode]))
    return outs


# FSDP with activation checkpointing of the ViT and the MED (recomputation must not change the losses), both with
# gradient clipping (the norm over sharded and replicated gradients)
OPTIONS = {'ddp': ['parallel=ddp', 'clip_grad=1.0'],
           'fsdp': ['parallel=fsdp', 'clip_grad=1.0', 'vit_grad_ckpt=true', 'vit_ckpt_layer=1', 'med_grad_ckpt=true']}


LOSSES = ['train_loss_ita', 'train_loss_itm', 'train_loss_lm']


def test_fsdp_pretraining_matches_ddp_losses_and_checkpoint_layout(pretrain_runs):
    """FSDP shards parameters, gradients and AdamW moments but is the same optimisation: epoch-mean losses within
    2% of DDP's (on the CPU in fp32 they agree to rounding, activation checkpointing included), and the checkpoint
    holds the same keys, shapes and original layout (query/key/value, not the fused qkv) as DDP's, with whole,
    unsharded tensors."""
    ddp, fsdp = (_last_log(pretrain_runs[m]) for m in ('ddp', 'fsdp'))
    _close(ddp, fsdp, LOSSES)
    a, b = (torch.load(pretrain_runs[m] / 'checkpoint_last.pth', weights_only=True) for m in ('ddp', 'fsdp'))
    assert [(k, v.shape) for k, v in a['model'].items()] == [(k, v.shape) for k, v in b['model'].items()]
    assert not any('self.qkv' in k or 'self.kv' in k for k in b['model'])
    assert any(k.endswith('attention.self.query.weight') for k in b['model'])
    assert all(type(v) is torch.Tensor for v in b['model'].values())  # no DTensor shards in the file
    for k in a['model']:  # the same to rounding (gradient norms and reductions are summed in other orders)
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-3, atol=1e-4)
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for i, state in a['optimizer']['state'].items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in b['optimizer']['state'][i].items()}


@pytest.fixture(scope='module')
def one_process_resume(pretrain_runs, toy, module_dir) -> tuple[dict, Path]:
    """The FSDP run's one-file checkpoint resumed in one process for a second epoch: (its stats, its folder)."""
    import pretrain
    out = module_dir('resume_one_process')
    saved = str(pretrain_runs['fsdp'] / 'checkpoint_last.pth')
    return pretrain.main(argv('pretrain', toy, out, '--resume', saved) + ['max_epoch=2', 'parallel=fsdp']), out


def test_fsdp_checkpoint_resumes_in_one_process(one_process_resume):
    """The FSDP run's checkpoint is the single-process model's: a plain ``python pretrain.py --resume`` continues
    it (model strict, optimizer state) for the next epoch."""
    stats, out = one_process_resume
    assert stats['epoch'] == 1 and all(stats[k] == stats[k] for k in LOSSES)
    saved = torch.load(out / 'checkpoint_01.pth', weights_only=True)
    assert saved['optimizer']['state'] and saved['epoch'] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_one_node_with_two_processes(pretrain_runs, toy, tmp_path):
    """Two torchrun agents (``--nnodes=2``, c10d rendezvous), one process each, as on two machines: the toy FSDP
    pretraining reaches the losses of one node with 2 processes."""
    port = _free_port()
    launcher = ['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}',
                '--rdzv_id=blip-test', '--max_restarts=0']
    args = argv('pretrain', toy, tmp_path) + OPTIONS['fsdp']
    out = _wait(_torchrun('pretrain', args, launcher), _torchrun('pretrain', args, launcher))
    assert 'distributed init (rank 0/2, gloo)' in out
    _close(_last_log(pretrain_runs['fsdp']), _last_log(tmp_path), LOSSES, rel=1e-3)


def test_fsdp_captioning_matches_ddp(toy, tmp_path):
    """Caption fine-tuning and its evaluation (beam search, each rank on its own images, weights gathered by
    ``run.eval_model``) under FSDP: same epoch loss as DDP, same captions, same checkpoint keys."""
    outs = {mode: tmp_path / mode for mode in ('ddp', 'fsdp')}
    extra = {'ddp': ['parallel=ddp'], 'fsdp': ['parallel=fsdp', 'med_grad_ckpt=true']}
    _wait(*[_torchrun('train_caption', argv('train_caption', toy, out) + extra[mode]) for mode, out in outs.items()])
    _close(_last_log(outs['ddp']), _last_log(outs['fsdp']), ['train_loss'])
    captions = [json.loads((out / 'result/val_epoch0.json').read_text()) for out in outs.values()]
    assert captions[0] == captions[1] and len(captions[0]) == 8
    a, b = (torch.load(out / 'checkpoint_best.pth', weights_only=True)['model'] for out in outs.values())
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]


ROUND_TRIP = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from engine import parallel
from engine.checkpoint_io import optimizer_state_in_our_layout
from models.blip_pretrain import BLIP_Pretrain
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
dist.init_process_group('gloo')
torch.manual_seed(dist.get_rank())  # rank 1 starts from other weights: the load must overwrite them
model = BLIP_Pretrain(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), queue_size=16)
model = parallel.wrap(model, 'fsdp', torch.device('cpu'))
assert parallel.is_sharded(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
saved = torch.load({file!r}, weights_only=True)
parallel.load_full_state(model, saved['model'])
optimizer.load_state_dict(parallel.shard_optimizer_state(
    model, optimizer, optimizer_state_in_our_layout(saved['optimizer'], model, optimizer)))
state = parallel.full_state_dict(model)
moments = parallel.full_optimizer_state(model, optimizer)
if dist.get_rank() == 0:
    assert list(state) == list(saved['model'])
    for k, v in saved['model'].items():
        assert torch.equal(state[k], v), k
    for i, s in saved['optimizer']['state'].items():
        for k, v in s.items():
            assert torch.equal(moments['state'][i][k], v), (i, k)
    print('ROUND TRIP OK')
dist.barrier()  # as Run.finish: no rank tears gloo down while the other still runs (one such run aborted at exit)
dist.destroy_process_group()
"""


def test_checkpoint_loads_into_fsdp_and_gathers_back_unchanged(tmp_path):
    """A single-process checkpoint (original layout: q/k/v separate) loaded into a 2-rank FSDP model -- each rank
    keeping its shard of every tensor, AdamW moments included -- gathers back to exactly the same file contents."""
    from engine.checkpoint_io import save_checkpoint
    model = _tiny_pretrain()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE), ['a dog', 'two cats'], alpha=0.4)[0].backward()
    optimizer.step()
    save_checkpoint(tmp_path / 'ck.pth', model, optimizer, {}, 0, 1)
    script = tmp_path / 'round_trip.py'
    script.write_text(ROUND_TRIP.format(root=str(ROOT), file=str(tmp_path / 'ck.pth')))
    out = _wait(subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                  str(script)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True))
    assert 'ROUND TRIP OK' in out


# ---------------------------------------------------------------------------------------------- one process

def _tiny_pretrain():
    from models.blip_pretrain import BLIP_Pretrain
    torch.manual_seed(0)
    return BLIP_Pretrain(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), queue_size=16)


def test_shard_units_of_pretraining_keep_shared_and_tied_parameters_together():
    """Units: every ViT block and MED layer, the cross-attention/FFN modules the encoder shares with the decoder
    (one unit, reached from both), the momentum encoders and projections; the word embeddings, tied to the LM
    head, stay with the root. No parameter is in two units."""
    from engine.parallel import shard_units
    from models.med import Layer
    from timm.models.vision_transformer import Block
    model = _tiny_pretrain()
    units = shard_units(model)
    ids = {id(u) for u in units}
    assert all(id(m) in ids for m in model.modules() if isinstance(m, (Block, Layer)))
    for name in ('visual_encoder', 'visual_encoder_m', 'text_encoder_m', 'vision_proj', 'vision_proj_m',
                 'text_proj', 'text_proj_m'):
        assert id(getattr(model, name)) in ids, name
    assert id(model.text_encoder) not in ids  # holds the embeddings tied to the decoder's LM head
    shared = model.text_decoder.bert.encoder.layer[0].crossattention
    assert shared is model.text_encoder.encoder.layer[0].crossattention and id(shared) in ids
    word = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert all(word is not p for u in units for p in u.parameters())
    owned = []  # each unit's own parameters: those of no unit inside it
    for u in units:
        inner = {id(p) for v in units if v is not u and any(v is m for m in u.modules()) for p in v.parameters()}
        owned += [id(p) for p in u.parameters() if id(p) not in inner]
    assert len(owned) == len(set(owned))


def test_pinned_momentum_update_equals_the_plain_one():
    """``PinnedPairs`` (what FSDP installs) list the parameters once; the EMA is the one of the plain pairs."""
    from models.momentum import PinnedPairs, momentum_update
    a, b = _tiny_pretrain(), _tiny_pretrain()
    with torch.no_grad():
        for p in [*a.parameters()]:
            p.add_(0.01)
        for p, q in zip(a.parameters(), b.parameters()):
            q.copy_(p)
    momentum_update(a.model_pairs, 0.9)
    momentum_update(PinnedPairs(b.model_pairs), 0.9)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_med_layer_checkpointing_saves_fewer_activations_same_gradients():
    """``med_grad_ckpt``: each MED layer keeps only its inputs for the backward pass and recomputes the rest; the
    loss and every gradient are those without it, and the state-dict keys are unchanged."""
    from engine.parallel import checkpoint_med_layers
    from models.blip import BLIP_Decoder

    def run(checkpointed: bool):
        torch.manual_seed(0)
        model = BLIP_Decoder(image_size=TINY_IMAGE, vit=dict(TINY_VIT), med_config=dict(TINY_MED))
        keys = list(model.state_dict())
        if checkpointed:
            assert checkpoint_med_layers(model) == 2
        assert list(model.state_dict()) == keys
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(1)),
                         ['a dog on the grass', 'two cats'])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    (loss, grads, saved), (loss_c, grads_c, saved_c) = run(False), run(True)
    torch.testing.assert_close(loss_c, loss)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], msg=n)
    assert saved_c < saved


def test_unknown_parallel_mode_is_one_clear_error(toy, tmp_path):
    import pretrain
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match=r"parallel must be one of ddp, fsdp, got 'zero3'"):
        pretrain.main(argv('pretrain', toy, tmp_path) + ['parallel=zero3'])


def test_models_do_not_import_the_engine():
    """models/ is usable without engine/ (the engine wraps models, not the reverse)."""
    for path in (ROOT / 'models').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == 'engine' or n.startswith('engine.') for n in names), f'{path.name} imports {names}'


# ---------------------------------------------------------------------------------------------- sharded checkpoints

@pytest.fixture(scope='module')
def sharded_run(toy, module_dir) -> Path:
    """The FSDP run of ``pretrain_runs`` again (2 processes) with ``checkpoint_format: sharded``: its resume point is
    ``checkpoint_last.dcp/``, every rank writing its own shards."""
    out = module_dir('pretrain_fsdp_sharded')
    _wait(_torchrun('pretrain', argv('pretrain', toy, out) + OPTIONS['fsdp'] + ['checkpoint_format=sharded']))
    return out


def _resume_dir(root: Path, name: str, checkpoint: Path) -> Path:
    """An output folder holding only ``checkpoint`` (a file or a sharded directory), for ``--resume auto``."""
    out = root / name
    out.mkdir()
    copy = shutil.copytree if checkpoint.is_dir() else shutil.copy2
    copy(checkpoint, out / checkpoint.name)
    return out


def _model_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)['model']


def test_sharded_resume_on_two_processes_continues_as_the_full_format(pretrain_runs, sharded_run, toy, tmp_path):
    """Every rank writes its shards (two .distcp files), and ``--resume auto`` on 2 processes finds the directory
    and continues exactly as from the one-file checkpoint of the same run: the same next-epoch losses and
    weights. A temporary directory a killed writer left is neither resumed from nor kept."""
    sharded = sharded_run / 'checkpoint_last.dcp'
    assert len(list(sharded.glob('*.distcp'))) == 2 and (sharded / 'meta.pth').is_file()
    assert not (sharded_run / 'checkpoint_last.pth').exists()
    dirs = {'full': _resume_dir(tmp_path, 'full', pretrain_runs['fsdp'] / 'checkpoint_last.pth'),
            'sharded': _resume_dir(tmp_path, 'sharded', sharded)}
    dead = dirs['sharded'] / '.checkpoint_last.dcp.0badf00d.tmp'
    dead.mkdir()
    (dead / '__0_0.distcp').write_bytes(b'half written')
    procs = {k: _torchrun('pretrain', argv('pretrain', toy, out, '--resume', 'auto') + OPTIONS['fsdp'] +
                          ['max_epoch=2', f"checkpoint_format={k}"]) for k, out in dirs.items()}
    outputs = {k: _wait(p) for k, p in procs.items()}
    assert f"resumed from {dirs['sharded'] / 'checkpoint_last.dcp'}: epoch 1, step 0" in outputs['sharded']
    full, resumed = (_last_log(dirs[k]) for k in ('full', 'sharded'))
    assert full['epoch'] == resumed['epoch'] == 1
    _close(full, resumed, LOSSES, rel=1e-6)
    a, b = (_model_of(dirs[k] / 'checkpoint_01.pth') for k in ('full', 'sharded'))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    left = sorted(p.name for p in dirs['sharded'].iterdir() if 'dcp' in p.name)
    assert left == ['checkpoint_last.dcp'], left  # published by rename: no .old, no temporary directory


def test_sharded_checkpoint_resumes_in_one_process(one_process_resume, sharded_run, toy, tmp_path):
    """Another world size: the 2-rank sharded checkpoint resumes in one process (no process group; DCP reads both
    ranks' shards into whole tensors), with the losses and weights of a 1-process resume from the one-file
    checkpoint of the same run; its own resume point is sharded too."""
    import pretrain
    full, full_out = one_process_resume
    stats = pretrain.main(argv('pretrain', toy, tmp_path, '--resume', str(sharded_run / 'checkpoint_last.dcp')) +
                          ['max_epoch=2', 'parallel=fsdp', 'checkpoint_format=sharded'])
    assert (tmp_path / 'checkpoint_last.dcp' / 'meta.pth').is_file()
    assert stats['epoch'] == 1
    _close(full, stats, LOSSES, rel=1e-6)
    a, b = (_model_of(out / 'checkpoint_01.pth') for out in (full_out, tmp_path))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_converter_writes_the_full_checkpoint_of_the_same_run(pretrain_runs, sharded_run, tmp_path):
    """``python -m engine.convert_checkpoint`` turns the sharded checkpoint into the one-file checkpoint of the same
    run: the same keys in the same order with the same shapes (original layout), equal tensors, the same AdamW state
    by parameter index; its model loads strictly into the single-process model and its tensors are then there."""
    from engine.convert_checkpoint import main as convert
    from models.blip_pretrain import blip_pretrain
    out = convert([str(sharded_run / 'checkpoint_last.dcp'), str(tmp_path / 'converted.pth')])
    full = torch.load(pretrain_runs['fsdp'] / 'checkpoint_last.pth', weights_only=True)
    # tensors shared by two keys (the encoder's and decoder's shared modules, tied embeddings) are written once,
    # as torch.save stores them once: the shards hold what the one file holds, not 1.5 times as much
    shards = sum(f.stat().st_size for f in (sharded_run / 'checkpoint_last.dcp').glob('*.distcp'))
    assert shards < 1.05 * (pretrain_runs['fsdp'] / 'checkpoint_last.pth').stat().st_size
    converted = torch.load(out, weights_only=True)
    assert [(k, v.shape) for k, v in converted['model'].items()] == [(k, v.shape) for k, v in full['model'].items()]
    for k, v in full['model'].items():
        torch.testing.assert_close(converted['model'][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert converted['optimizer']['param_groups'] == full['optimizer']['param_groups']
    assert converted['optimizer']['state'].keys() == full['optimizer']['state'].keys()
    for i, state in full['optimizer']['state'].items():
        for k, v in state.items():
            torch.testing.assert_close(converted['optimizer']['state'][i][k], v, rtol=1e-5, atol=1e-6)
    assert converted['resume'] == full['resume'] and converted['epoch'] == full['epoch'] == 0
    assert len(converted['rng']) == 2
    c = converted['config']
    model = blip_pretrain(queue_size=c['queue_size'], momentum=c['momentum'], image_size=c['image_size'], vit=c['vit'],
                          med_config=c['med_config'])
    model.load_state_dict(converted['model'], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted['model'][k]), k


def test_incomplete_or_mismatched_sharded_checkpoint_is_one_clear_error(sharded_run, tmp_path):
    """A directory a killed writer left incomplete, a checkpoint of another model, a sharded directory given where a
    one-file checkpoint is read: each a ``CheckpointError`` naming the directory and what is wrong. A kill between
    the two renames of a save leaves the previous checkpoint as ``.old``, which ``--resume auto`` takes."""
    from engine.convert_checkpoint import convert
    from engine.sharded_checkpoint import find_resume_point, load_sharded_training_state
    from models.blip import BLIP_Decoder
    from models.checkpoint import CheckpointError, read_checkpoint
    saved = sharded_run / 'checkpoint_last.dcp'
    decoder = BLIP_Decoder(image_size=TINY_IMAGE, vit=dict(TINY_VIT), med_config=dict(TINY_MED))
    with pytest.raises(CheckpointError, match=r'checkpoint_last.dcp: sharded checkpoint does not match the model: '
                                              r'\d+ unexpected keys \(first: temp, .*; \d+ shapes differ \(file vs '
                                              r'model\) \(first: visual_encoder.cls_token \(1, 1, 64\) vs \(1, 1, 32\)'):
        load_sharded_training_state(saved, decoder, None)
    with pytest.raises(CheckpointError, match=r'a sharded training checkpoint .*python -m engine.convert_checkpoint'):
        read_checkpoint(str(saved))
    with pytest.raises(CheckpointError, match=r'a one-file checkpoint already'):
        convert(sharded_run / 'checkpoint_00.pth', tmp_path / 'x.pth')
    broken = _resume_dir(tmp_path, 'broken', saved) / 'checkpoint_last.dcp'
    (broken / '.metadata').unlink()
    for call in (lambda: load_sharded_training_state(broken, decoder, None), lambda: convert(broken, tmp_path / 'y')):
        with pytest.raises(CheckpointError, match=r'checkpoint_last.dcp: incomplete sharded checkpoint \(no '
                                                  r'\.metadata\): its writer stopped'):
            call()
    assert find_resume_point(broken.parent) is None
    killed = _resume_dir(tmp_path, 'killed', saved)
    (killed / 'checkpoint_last.dcp').rename(killed / 'checkpoint_last.dcp.old')
    assert find_resume_point(killed) == killed / 'checkpoint_last.dcp.old'


def test_sharded_checkpoints_count_as_an_earlier_run_and_resume_takes_the_newer_format(tmp_path):
    """A folder with a sharded checkpoint is refused to a fresh run and emptied by ``--overwrite`` (its temporary
    and ``.old`` directories too); ``--resume auto`` takes whichever of checkpoint_last.pth / .dcp is newer; an
    unknown ``checkpoint_format`` is one clear error."""
    import argparse
    from engine.config import ConfigError
    from engine.runner import check_output_dir, remove_earlier_run
    from engine.sharded_checkpoint import find_resume_point
    sharded = tmp_path / 'checkpoint_last.dcp'
    for d in (sharded, tmp_path / 'checkpoint_last.dcp.old', tmp_path / '.checkpoint_last.dcp.1234abcd.tmp'):
        d.mkdir()
        (d / '.metadata').write_bytes(b'')
        (d / 'meta.pth').write_bytes(b'')
    args = argparse.Namespace(output_dir=str(tmp_path), evaluate=False, resume=None, overwrite=False)
    with pytest.raises(ConfigError, match=r'holds checkpoints of an earlier run \(checkpoint_last.dcp\)'):
        check_output_dir(args)
    full = tmp_path / 'checkpoint_last.pth'
    full.write_bytes(b'')
    os.utime(sharded / 'meta.pth', (1, 1))
    assert find_resume_point(tmp_path) == full
    os.utime(full, (0, 0))
    assert find_resume_point(tmp_path) == sharded
    remove_earlier_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_checkpoint_format_is_one_clear_error(toy, tmp_path):
    import pretrain
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match=r"checkpoint_format must be one of full, sharded, got 'zip'"):
        pretrain.main(argv('pretrain', toy, tmp_path) + ['checkpoint_format=zip'])
