"""A whole training step as one CUDA graph (engine.cuda_graph): what can be checked without a GPU.

A graph replays recorded kernels, so the step must read nothing back to the host and keep fixed shapes, must
take every per-batch value from its static buffers, and must not update the weights on a non-finite loss
(the eager loop checks the loss on the host first). The capture itself needs a GPU
(``benchmarks/pretrain_step.py --cuda-graph``); here the same step runs eagerly on the same buffers.
"""
import copy

import pytest
import torch

import models.losses
import models.med
from engine.cuda_graph import GraphedStep, guarded_update, training_step
from engine.optim import create_optimizer, set_lr
from models.losses import lm_loss_at_targets
from tests.dispatched import DispatchedOps
from tests.test_models_pretrain import CAPTIONS, images, tiny_pretrain

# operators that read a device value on the host (a sync, forbidden while recording) or whose output shape
# depends on values; boolean indexing runs nonzero inside the indexing kernel
READS_BACK = {'_local_scalar_dense', 'nonzero', 'masked_select', 'unique', '_unique2', 'masked_scatter'}


class HostReads(DispatchedOps):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = args[1] if func.overloadpacket.__name__ in ('index', 'index_put', 'index_put_') else ()
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices):
            self.ops.append(f'{func.overloadpacket.__name__} with a boolean index')
            self.shapes.append(None)
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def reads_back(self) -> list[str]:
        return [op for op in self.ops if op in READS_BACK or 'boolean index' in op]


def test_lm_loss_with_static_shapes_equals_the_loss_at_selected_targets():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 6))
    labels[0, 4:] = -100
    labels[2, 1:] = -100  # a row without any target
    for reduction in ('mean', 'none'):
        selected = lm_loss_at_targets(hidden, labels, head, reduction=reduction, static_shapes=False)
        static = lm_loss_at_targets(hidden, labels, head, reduction=reduction, static_shapes=True)
        torch.testing.assert_close(static, selected, rtol=1e-6, atol=1e-6)
        g_sel = torch.autograd.grad(selected.sum(), [hidden, head.weight])
        g_static = torch.autograd.grad(static.sum(), [hidden, head.weight])
        for a, b in zip(g_static, g_sel):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert lm_loss_at_targets(hidden, torch.full_like(labels, -100), head, static_shapes=True).isnan()


def test_pretraining_reads_nothing_back_while_a_graph_is_recorded(monkeypatch):
    """Forward and backward of BLIP_Pretrain.losses: no host read once the LM loss keeps static shapes (the
    eager path's target selection is the only one, so the check would see a regression elsewhere)."""
    model = tiny_pretrain()
    text = model.tokenize(CAPTIONS)
    alpha = torch.tensor(0.4)

    def fwd_bwd():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = sum(model.losses(images(4), text.input_ids, text.attention_mask, alpha))
        loss.backward()

    with HostReads() as eager:
        fwd_bwd()
    assert eager.reads_back() and all('boolean index' in op for op in eager.reads_back())
    monkeypatch.setattr(models.losses, 'capturing', lambda: True)
    with HostReads() as recorded:
        fwd_bwd()
    assert recorded.reads_back() == []
    assert recorded.ops.count('exponential_') == 2  # both ITM negative draws ran, on the device


def test_losses_on_tokens_with_a_tensor_alpha_equal_forward_on_captions():
    model = tiny_pretrain()
    text = model.tokenize(CAPTIONS)
    assert text.input_ids.shape == (4, 30) == text.attention_mask.shape
    torch.manual_seed(5)
    expected = model(images(4), CAPTIONS, alpha=0.3)
    model = tiny_pretrain()
    torch.manual_seed(5)
    got = model.losses(images(4), text.input_ids, text.attention_mask, torch.tensor(0.3))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class Schema(dict):
    """The two keys create_optimizer reads."""

    def __init__(self, init_lr):
        super().__init__(weight_decay=0.05)
        self.init_lr = init_lr


def _step_for(model, opt):
    return training_step(lambda **batch: {'loss': sum(model.losses(**batch))}, opt)


def _batches(model, n):
    caps = [CAPTIONS, CAPTIONS[::-1], ['a cat', 'grass', 'a man riding a horse on a beach', 'two cups']]
    for i in range(n):
        text = model.tokenize(caps[i % 3])
        yield dict(image=images(4, seed=10 + i), input_ids=text.input_ids, attention_mask=text.attention_mask,
                   alpha=torch.tensor(0.1 * i))


def test_graphed_step_trains_like_the_eager_loop_on_its_static_buffers():
    """Each batch is copied into the same buffers; the weights, moments, queue and losses follow the eager
    loop (zero_grad, losses, backward, step) exactly, alpha changing per step."""
    model = tiny_pretrain()
    twin = copy.deepcopy(model)
    opt = create_optimizer(model, Schema(init_lr=1e-3), capturable=True)
    opt_twin = create_optimizer(twin, Schema(init_lr=1e-3), capturable=True)
    lr = opt.param_groups[0]['lr']
    graphed = GraphedStep(_step_for(model, opt), opt, warmup=2)
    buffers = None
    torch.manual_seed(7)
    losses = []
    for i, batch in enumerate(_batches(model, 4)):
        set_lr(opt, 1e-3 / (i + 1))
        losses.append(graphed(**batch)['loss'].clone())
        buffers = buffers or {k: v.data_ptr() for k, v in graphed.static.items()}
        assert {k: v.data_ptr() for k, v in graphed.static.items()} == buffers
    torch.manual_seed(7)
    for i, batch in enumerate(_batches(twin, 4)):
        set_lr(opt_twin, 1e-3 / (i + 1))
        opt_twin.zero_grad(set_to_none=True)
        loss = sum(twin.losses(**batch))
        loss.backward()
        opt_twin.step()
        assert torch.equal(losses[i], loss.detach())
    assert not graphed.captured and graphed.calls == 4  # no CUDA: every call ran eagerly
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert opt.param_groups[0]['lr'] is lr and lr.item() == pytest.approx(1e-3 / 4)  # filled in place


def test_graphed_step_refuses_other_shapes_keys_and_python_values():
    model = tiny_pretrain()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=torch.tensor(1e-3), fused=True)
    graphed = GraphedStep(_step_for(model, opt), opt)
    batch = next(_batches(model, 1))
    with pytest.raises(TypeError, match='alpha'):
        graphed(**{**batch, 'alpha': 0.4})
    graphed(**batch)
    with pytest.raises(ValueError, match="'image'.*pad the batch"):
        graphed(**{**batch, 'image': images(3)})
    with pytest.raises(ValueError, match='inputs'):
        graphed(image=batch['image'])
    with pytest.raises(ValueError, match='warmup'):
        GraphedStep(_step_for(model, opt), opt, warmup=0)


def test_guarded_update_leaves_weights_and_moments_alone_on_a_non_finite_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(0.1), fused=True)
    for bad in (False, True):
        before = [p.detach().clone() for p in net.parameters()]
        state = copy.deepcopy(opt.state_dict()['state'])
        loss = net(torch.randn(3, 4)).sum() * (float('nan') if bad else 1.0)
        loss.backward()
        guarded_update(opt, loss)
        changed = [not torch.equal(p, b) for p, b in zip(net.parameters(), before)]
        if bad:
            assert not any(changed)
            assert all(torch.equal(opt.state[p]['step'], state[i]['step']) and
                       torch.equal(opt.state[p]['exp_avg'], state[i]['exp_avg'])
                       for i, p in enumerate(net.parameters()))
        else:
            assert all(changed)
        opt.zero_grad(set_to_none=True)
    assert not hasattr(opt, 'found_inf')
    with pytest.raises(TypeError, match='found_inf'):
        guarded_update(torch.optim.AdamW(net.parameters()), loss)


# ---------------------------------------------------------------------------------------------- pretrain.py

@pytest.fixture(scope='module')
def toy(module_dir):
    from data.toy import ensure_toy_dataset
    return ensure_toy_dataset(module_dir('toy'), n_train=12, n_val=4, n_test=4, n_web=12, n_videos=2,
                              video_frames=2)


def _pretrain(toy, out, *options, resume=None):
    import pretrain
    r = str(toy)
    argv = ['--config', 'configs/toy/pretrain.yaml', '--output_dir', str(out), '--device', 'cpu',
            *(['--resume', str(resume)] if resume else []), '--options', f'toy_root={r}',
            f'train_file=[{r}/annotation/coco_karpathy_train.json, {r}/annotation/pretrain_noisy.json]',
            f'image_root={r}/images', 'num_workers=0', 'image_size=32', 'batch_size=8', 'queue_size=16',
            'warmup_steps=3', 'max_epoch=2', 'log_every=1', *options]
    return pretrain.main(argv)


def test_pretrain_script_with_cuda_graph_trains_like_the_eager_step(toy, tmp_path):
    """``cuda_graph: true`` (here without CUDA: the graph's step run eagerly on its buffers) gives the
    eager script's losses and weights up to float rounding (tensor alpha and LR, fused AdamW), and its
    checkpoint resumes in an eager run."""
    torch.set_num_threads(1)
    eager = _pretrain(toy, tmp_path / 'eager')
    graphed = _pretrain(toy, tmp_path / 'graphed', 'cuda_graph=True')
    for key in ('train_loss_ita', 'train_loss_itm', 'train_loss_lm'):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-4), key
    a = torch.load(tmp_path / 'eager/checkpoint_last.pth', weights_only=True)
    b = torch.load(tmp_path / 'graphed/checkpoint_last.pth', weights_only=True)
    for k, want in a['model'].items():
        got = b['model'][k]
        # a key bias has no effect on attention (softmax is shift-invariant), so its gradient is rounding
        # noise, which Adam scales up to full steps: those differ between any two summation orders
        if k.endswith('key.bias'):
            continue
        if k.endswith('attn.qkv.bias'):  # ViT: query, key, value biases in one tensor
            third = want.shape[0] // 3
            got, want = torch.cat([got[:third], got[2 * third:]]), torch.cat([want[:third], want[2 * third:]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=k)
    assert isinstance(b['optimizer']['param_groups'][0]['lr'], torch.Tensor)
    resumed = _pretrain(toy, tmp_path / 'graphed', 'max_epoch=3', resume=tmp_path / 'graphed/checkpoint_01.pth')
    assert resumed['epoch'] == 2 and all(map(torch.isfinite, map(torch.tensor, resumed.values())))


def test_pretrain_script_with_cuda_graph_accumulates_and_clips_like_the_eager_loop(toy, tmp_path):
    """accum_steps 2 (the epoch's 5 batches: windows of 2, 2 and a short 1) and clip_grad 0.5 (small enough
    to clip) in the graphed step give the eager loop's epoch losses."""
    torch.set_num_threads(1)
    opts = ('accum_steps=2', 'clip_grad=0.5', 'max_epoch=1')
    eager = _pretrain(toy, tmp_path / 'eager', *opts)
    graphed = _pretrain(toy, tmp_path / 'graphed', 'cuda_graph=True', *opts)
    for key in ('train_loss_ita', 'train_loss_itm', 'train_loss_lm'):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-4), key


def test_pretrain_script_refuses_cuda_graph_with_fp16(toy, tmp_path):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match='fp16'):
        _pretrain(toy, tmp_path / 'bad', 'cuda_graph=True', 'amp=fp16')


def test_accumulation_windows_cover_the_epoch():
    from engine.cuda_graph import accumulation_window
    windows = [accumulation_window(s, 7, 3) for s in range(7)]
    assert windows == [(False, 3), (False, 3), (True, 3), (False, 3), (False, 3), (True, 3), (True, 1)]
    assert [accumulation_window(s, 4, 1) for s in range(4)] == [(True, 1)] * 4


def test_train_step_accumulates_clips_and_guards_like_the_eager_loop():
    """TrainStep (two parts, flat gradient buffer) against zero_grad / scaled backward per batch / clip / step:
    same losses and weights over two windows of 2; a NaN batch in a window skips that window's update; a
    ``zero_grad(set_to_none=True)`` from outside does not detach the buffer."""
    from engine.cuda_graph import TrainStep
    model = tiny_pretrain()
    twin = copy.deepcopy(model)
    opt = create_optimizer(model, Schema(init_lr=1e-3), capturable=True)
    opt_twin = create_optimizer(twin, Schema(init_lr=1e-3), capturable=True)
    step = TrainStep(lambda **b: {'loss': sum(model.losses(**b))}, opt, accum_steps=2, clip_grad=0.05)
    batches = list(_batches(model, 4))
    torch.manual_seed(7)
    got = [step(i % 2 == 1, 2, **b)['loss'].clone() for i, b in enumerate(batches)]
    torch.manual_seed(7)
    want = []
    for i, b in enumerate(batches):
        loss = sum(twin.losses(**b))
        (loss / 2).backward()
        want.append(loss.detach())
        if i % 2 == 1:
            norm = torch.nn.utils.clip_grad_norm_([p for p in twin.parameters() if p.requires_grad], 0.05)
            assert norm > 0.05  # the test clips
            opt_twin.step()
            opt_twin.zero_grad(set_to_none=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert not step.captured  # no CUDA: both parts ran eagerly
    # a non-finite loss anywhere in the window: no update; the buffer is cleared for the next window
    # (the forward itself moves the momentum encoders and queues: only the trained weights must stay)
    before = [p.detach().clone() for p in step.params]
    opt.zero_grad(set_to_none=True)
    nan_batch = {**batches[0], 'image': batches[0]['image'] * float('nan')}
    step(False, 2, **batches[1])
    assert not torch.isfinite(step(True, 2, **nan_batch)['loss'])
    assert all(torch.equal(b, p) for b, p in zip(before, step.params))
    assert float(step.flat.abs().sum()) == 0 and float(step.nonfinite) == 0
    assert all(p.grad is v for p, v in zip(step.params, step.views))


# ------------------------------------------------------------------------------------ dropout in a replayed graph

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='records a CUDA graph')
def test_replayed_training_step_draws_fresh_attention_dropout_masks():
    """The pretraining step with attention dropout only (lr 0, one fixed batch): the LM loss differs between
    replays as it does between eager steps (an attention kernel whose mask were frozen at capture would give
    the same LM loss at every replay)."""
    import benchmarks.graph_dropout_check as check
    out: list = []
    check.model_check(out, 'tiny')
    assert out and out[0]['pass'], out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='records a CUDA graph')
def test_every_sdpa_kernel_draws_a_fresh_dropout_mask_per_replay():
    """cuDNN, memory-efficient, flash and math attention, with and without a mask (where the kernel takes the
    inputs): the dropout mask read off a replayed graph changes from one replay to the next, at rate p."""
    import benchmarks.graph_dropout_check as check
    out: list = []
    check.sdpa_checks(['CUDNN_ATTENTION', 'EFFICIENT_ATTENTION', 'FLASH_ATTENTION', 'MATH'], out)
    assert out and all(r['pass'] for r in out), out


# ------------------------------------------------------------------------------------ cuda_graph: empty = auto

def test_empty_cuda_graph_turns_the_graphed_training_step_on_where_it_is_known_to_work(capsys):
    """One CUDA process with bf16 or fp32: on. No GPU, fp16 (no replayed loss scaler), activation checkpointing
    or several processes (not yet validated on GPUs): off, saying why. A value set in the config is taken as it
    is."""
    from types import SimpleNamespace

    from engine.runner import Run

    def resolve(value, device='cuda', precision='bf16', distributed=False, ckpt=False):
        run = SimpleNamespace(config={'cuda_graph': value, 'vit_grad_ckpt': ckpt}, device=torch.device(device),
                              precision=precision, distributed=distributed, is_main=True)
        return Run._resolve_graphed_step(run)
    assert resolve(None) and resolve(None, precision='none')
    assert not resolve(None, device='cpu') and 'no CUDA device' in capsys.readouterr().out
    assert not resolve(None, precision='fp16') and 'fp16' in capsys.readouterr().out
    assert not resolve(None, distributed=True) and 'cuda_graph: true enables it' in capsys.readouterr().out
    assert not resolve(None, ckpt=True) and 'vit_grad_ckpt' in capsys.readouterr().out
    assert resolve(True, device='cpu') and not resolve(False)
    assert 'cuda_graph: false (set in the config): the training step runs eagerly' in capsys.readouterr().out


def test_caption_decoding_graphs_are_on_with_a_gpu_unless_set():
    from engine.cuda_graph import decoding_note
    assert 'replays one CUDA graph per step (auto: a CUDA device)' in decoding_note(None, torch.device('cuda'))
    assert 'runs eagerly (auto: no CUDA device)' in decoding_note(None, torch.device('cpu'))
    assert 'runs eagerly (set in the config)' in decoding_note(False, torch.device('cuda'))


def test_caption_losses_on_fixed_length_tokens_equal_forward():
    """The captioner's graph inputs (captions padded to 40 tokens) give forward's loss (padded to the longest)."""
    from models.blip import BLIP_Decoder
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    torch.manual_seed(0)
    model = BLIP_Decoder(med_config=TINY_MED, image_size=TINY_IMAGE, vit=TINY_VIT).eval()
    image = torch.randn(3, 3, TINY_IMAGE, TINY_IMAGE)
    caps = ['a picture of a dog', 'a picture of two red cups on a table', 'a picture of grass']
    text = model.tokenize(caps, static=True)
    assert text.input_ids.shape == (3, 40)
    torch.testing.assert_close(model.losses(image, text.input_ids, text.attention_mask), model(image, caps))


# ------------------------------------------------------------------- fine-tuning tasks: static = eager formulation

def _losses_and_grads(model, seed: int, fn) -> tuple[list, dict]:
    """``fn(model)``'s losses and the gradients of their sum, with the RNG at ``seed`` (dropout, negatives)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = fn(model)
    losses = list(losses) if isinstance(losses, (tuple, list)) else [losses]
    sum(losses).backward()
    return [v.detach() for v in losses], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_static_equals_eager(model, eager, static, reads_back_ok=()):
    """The static formulation's losses and gradients equal the eager step's on the same weights and RNG draws,
    and its forward + backward reads nothing back to the host (as while a graph is recorded)."""
    twin = copy.deepcopy(model)
    want, want_grads = _losses_and_grads(model, 3, eager)
    with HostReads() as seen:
        got, got_grads = _losses_and_grads(twin, 3, static)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 10
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert [op for op in seen.reads_back() if op not in reads_back_ok] == []
    return got


def test_retrieval_losses_on_tokens_equal_forward_and_read_nothing_back():
    """BLIP_Retrieval.losses (the captured step's body: 35-token ids, tensor alpha, ITM negatives drawn on the
    device) against forward on caption strings with a float alpha: same ITC/ITM losses and gradients, dropout on;
    two captions of one image (idx) so the id-aware targets and negatives are exercised."""
    from tests.test_models_retrieval import CAPTIONS as RCAPS, images as rimages, tiny as tiny_retrieval
    model = tiny_retrieval(queue_size=12).train()
    idx = torch.tensor([0, 1, 0, 2, 3, 4])
    text = model.tokenize(RCAPS)
    assert text.input_ids.shape == (6, 35)
    got = _assert_static_equals_eager(
        model, lambda m: m(rimages(6), RCAPS, alpha=0.3, idx=idx),
        lambda m: m.losses(rimages(6), text.input_ids, text.attention_mask, torch.tensor(0.3), idx))
    assert len(got) == 2 and all(torch.isfinite(v) for v in got)


def _graphed_vs_eager(script: str, toy, tmp_path, monkeypatch, *options: str) -> tuple[dict, dict]:
    """``script``'s epoch stats with ``cuda_graph: false`` and with the key empty where the auto rule says yes (as
    on one GPU: ``Run._resolve_graphed_step`` answers True; here the two graph parts run eagerly on their static
    buffers), both with accumulation and clipping."""
    import importlib

    from engine.runner import Run
    from tests.test_scripts import argv
    torch.set_num_threads(1)
    main = importlib.import_module(script).main
    opts = ['accum_steps=2', 'clip_grad=0.5', *options]
    eager = main(argv(script, toy, tmp_path / 'eager') + opts + ['cuda_graph=False'])
    chosen = []
    monkeypatch.setattr(Run, '_resolve_graphed_step', lambda self, auto=True: chosen.append(auto) or True)
    graphed = main(argv(script, toy, tmp_path / 'graphed') + opts)
    assert chosen == [True]  # auto-on for this task, under the same blockers as pretraining
    lrs = [torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True)['optimizer']['param_groups'][0]['lr']
           for d in ('eager', 'graphed')]
    assert not isinstance(lrs[0], torch.Tensor) and isinstance(lrs[1], torch.Tensor)  # the graphed run's optimizer
    return eager, graphed


def test_retrieval_script_graphed_step_trains_like_the_eager_one(toy, tmp_path, monkeypatch):
    eager, graphed = _graphed_vs_eager('train_retrieval', toy, tmp_path, monkeypatch)
    for key in ('train_loss_ita', 'train_loss_itm', 'val_r_mean'):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-4), key


def test_nlvr_losses_on_fixed_length_tokens_equal_forward_and_read_nothing_back():
    """BLIP_NLVR.losses on sentences padded to a fixed 24 tokens (the captured step's body) against forward, which
    pads to the batch's longest: same loss and gradients (ViT stochastic depth on; MED dropout off, whose masks
    would have another shape); a sentence longer than the fixed length is refused, never cut."""
    from models.blip_nlvr import BLIP_NLVR
    from tests.test_models_retrieval import MED_NO_DROPOUT
    from tests.tiny import TINY_IMAGE, TINY_VIT
    torch.manual_seed(0)
    model = BLIP_NLVR(med_config=dict(MED_NO_DROPOUT), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).train()
    texts = ['the left image has two dogs', 'there is a bird', 'one image shows exactly three red cups on a table']
    targets = torch.tensor([1, 0, 1])
    image = images(6)
    tokens = model.tokenize(texts, length=24)
    assert tokens.input_ids.shape == (3, 24) and model.tokenize(texts).input_ids.shape[1] < 24
    _assert_static_equals_eager(model, lambda m: m(image, texts, targets, train=True),
                                lambda m: m.losses(image, tokens.input_ids, tokens.attention_mask, targets))
    with pytest.raises(ValueError, match='fixed length 4'):
        model.tokenize(texts, length=4)


def test_static_text_length_is_the_longest_rounded_up_and_capped():
    from engine.cuda_graph import static_text_length
    from models.blip import init_tokenizer
    tok = init_tokenizer()
    texts = ['a dog', 'two dogs on a red sofa next to a window', 'sky']
    longest = max(len(ids) for ids in tok(texts)['input_ids'])
    assert static_text_length(tok, texts, 512) == -(-longest // 8) * 8 >= longest
    assert static_text_length(tok, texts, 512, chunk=1) == static_text_length(tok, texts, 512)
    assert static_text_length(tok, texts, longest) == longest


def test_nlvr_script_graphed_step_trains_like_the_eager_one(toy, tmp_path, monkeypatch, capsys):
    eager, graphed = _graphed_vs_eager('train_nlvr', toy, tmp_path, monkeypatch)
    assert 'sentences padded to' in capsys.readouterr().out
    for key in ('train_loss', 'val_acc'):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-4), key


@pytest.mark.parametrize('n', [[2, 2], [1, 3]])
def test_vqa_losses_on_fixed_answer_rows_equal_forward_and_read_nothing_back(n, monkeypatch):
    """BLIP_VQA.losses (35-token questions; 4 answer rows per question, 8 tokens each, filler rows weighted 0) against
    forward(train=True) on the flattened answer lists (the eager step: row grouping for equal counts, repeated
    keys/values for unequal ones): same loss and gradients, stochastic depth on; no host read while recorded (the
    eager path reads the answer counts back); more answers or tokens than the fixed layout are refused."""
    from models.blip_vqa import BLIP_VQA
    from tests.test_models_retrieval import MED_NO_DROPOUT
    from tests.test_models_vqa import QUESTIONS
    from tests.tiny import TINY_IMAGE, TINY_VIT
    torch.manual_seed(0)
    model = BLIP_VQA(med_config=dict(MED_NO_DROPOUT), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).train()
    answers, weights = ['yes', 'red car', 'two', 'on the wall'], torch.tensor([1.0, 0.5, 0.3, 0.2])
    image = images(2)
    q = model.tokenize_questions(QUESTIONS, static=True)
    ids, mask, w = model.static_answers(answers, n, weights, per_question=4, length=8)
    assert q.input_ids.shape == (2, 35) and ids.shape == mask.shape == (8, 8) and w.shape == (8,)
    assert float(w.sum()) == pytest.approx(float(weights.sum())) and int((w == 0).sum()) == 4
    for module in (models.losses, models.med):  # the decoder's loss and cross-attention mask as while recording
        monkeypatch.setattr(module, 'capturing', lambda: True)
    _assert_static_equals_eager(
        model, lambda m: m(image, QUESTIONS, answers, n=n, weights=weights, train=True),
        lambda m: m.losses(image, q.input_ids, q.attention_mask, ids, mask, w))
    with pytest.raises(ValueError, match='fixed 1 per question'):
        model.static_answers(answers, n, weights, per_question=1, length=8)
    with pytest.raises(ValueError, match='fixed length 3'):
        model.static_answers(answers, n, weights, per_question=4, length=3)


def test_vqa_script_graphed_step_trains_like_the_eager_one(toy, tmp_path, monkeypatch, capsys):
    import json
    eager, graphed = _graphed_vs_eager('train_vqa', toy, tmp_path, monkeypatch)
    assert 'answers in' in capsys.readouterr().out
    assert graphed['test_vqa_accuracy'] == pytest.approx(eager['test_vqa_accuracy'], rel=1e-4)
    epochs = [json.loads((tmp_path / d / 'log.txt').read_text().splitlines()[0]) for d in ('eager', 'graphed')]
    assert epochs[1]['train_loss'] == pytest.approx(epochs[0]['train_loss'], rel=1e-4)
