"""Do dropout masks change between CUDA-graph replays? One PASS/FAIL line per check (GPU check, issue 23).

A replayed graph must draw a fresh dropout mask every replay, as eager calls do. Each attention kernel that
``scaled_dot_product_attention`` may pick has its own random-number handling; one that reads the generator's
seed and offset on the host at capture time replays the same mask forever, and a model trained with it
learns as if a fixed sub-network were its whole capacity. (Issue 23 suspected this from a graph run's lower LM
loss; on an H200 with torch 2.11 every kernel passed, and the loss difference was within the seed-to-seed
spread of eager runs: BENCHMARKS.md.)

Probe: with q = k = 0 every attention probability is 1/L, and with v = I the output is the (scaled) dropout
mask itself: ``out[..., i, j] = keep[i, j] / (L (1 - p))``. Each kernel is run eagerly twice and replayed three
times from one capture; the drop rate (should be ~p) and the share of positions equal between two draws (~1 - 2p(1-p)
for independent masks, 1.0 for a frozen one) are printed.

Then the model-level check: the pretraining model (tiny, and base size) with dropout 0.1, one fixed batch and lr 0,
so that only dropout makes one step's losses differ from the next: eager steps and replays must both vary,
by similar amounts, and have the same mean within noise.

    python benchmarks/graph_dropout_check.py            # needs CUDA; prints SKIP without it
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

P = 0.1


def _verdict(ok: bool, name: str, detail: dict, out: list) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(detail)}", flush=True)
    out.append({'check': name, 'pass': ok, **detail})


def _probe_inputs(masked: bool, dtype=torch.bfloat16):
    B, H, L = 4, 4, 64
    q = torch.zeros(B, H, L, L, device='cuda', dtype=dtype, requires_grad=True)
    k = torch.zeros(B, H, L, L, device='cuda', dtype=dtype, requires_grad=True)
    v = torch.eye(L, device='cuda', dtype=dtype).expand(B, H, L, L).contiguous().requires_grad_(True)
    mask = torch.zeros(B, 1, 1, L, device='cuda', dtype=dtype) if masked else None
    return q, k, v, mask


def _mask_stats(masks: list) -> dict:
    drop = [1 - m.float().mean().item() for m in masks]
    agree = [(a == b).float().mean().item() for a, b in zip(masks, masks[1:])]
    return {'drop_rate': [round(d, 4) for d in drop], 'agreement': [round(a, 4) for a in agree]}


def sdpa_checks(backend_names: list, out: list) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    expected_agree = 1 - 2 * P * (1 - P)
    for name in backend_names:
        backend = getattr(SDPBackend, name)
        for masked in (False, True):
            label = f'sdpa_dropout_fresh_per_replay[{name},{"mask" if masked else "nomask"}]'
            q, k, v, mask = _probe_inputs(masked)

            def call():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=P)
            try:
                eager = [(call() != 0).detach().clone() for _ in range(2)]
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = call()
                replays = []
                for _ in range(3):
                    graph.replay()
                    replays.append((static != 0).detach().clone())
                torch.cuda.synchronize()
            except RuntimeError as e:  # kernel not available for these inputs on this GPU / build
                print(f'SKIP {label} {str(e).splitlines()[0][:160]}', flush=True)
                continue
            e_stats, g_stats = _mask_stats(eager), _mask_stats(replays)
            ok = (all(abs(d - P) < 0.03 for d in g_stats['drop_rate'])
                  and all(a < (1 + expected_agree) / 2 for a in g_stats['agreement']))
            _verdict(ok, label, {'eager': e_stats, 'graph': g_stats, 'independent_agreement': round(expected_agree, 4)},
                     out)


def nn_dropout_check(out: list) -> None:
    x = torch.ones(64, 1024, device='cuda')
    graph = torch.cuda.CUDAGraph()
    F.dropout(x, P)
    with torch.cuda.graph(graph):
        y = F.dropout(x, P)
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append((y != 0).clone())
    stats = _mask_stats(masks)
    _verdict(all(a < 0.95 for a in stats['agreement']), 'nn_dropout_fresh_per_replay', stats, out)


def model_check(out: list, size: str = 'tiny', attention_dropout: float = P, hidden_dropout: float = 0.0,
                steps: int = 8, device: str = 'cuda') -> None:
    """BLIP_Pretrain with dropout, lr 0, one fixed batch: the LM loss varies from step to step only by dropout.

    With dropout only in attention (the default), a kernel that replays a frozen mask gives the same LM loss at
    every replay, while eager steps differ."""
    import tempfile

    from engine.cuda_graph import GraphedStep, training_step
    from models.blip_pretrain import blip_pretrain

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
    src = 'configs/toy/med_config.json' if size == 'tiny' else 'configs/med_config.json'
    with open(os.path.join(root, src)) as f:
        med = json.load(f)
    med.update(attention_probs_dropout_prob=attention_dropout, hidden_dropout_prob=hidden_dropout)
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(med, f)
    torch.manual_seed(0)
    image_size = 64 if size == 'tiny' else 224
    model = blip_pretrain(med_config=f.name, image_size=image_size, vit='tiny' if size == 'tiny' else 'base',
                          queue_size=64).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    image = torch.randn(8, 3, image_size, image_size, device=device)
    text = model.tokenize([f'a {c} {s} on the {w} side' for c, s, w in
                           zip('red blue green black white pink gray cyan'.split(),
                               'circle square star cross ring disk bar dot'.split(), ['left', 'right'] * 4)],
                          device=device)
    alpha = torch.tensor(0.4, device=device)
    # lr 0 keeps the weights; the momentum twin still moves towards them (unchanged too: same weights)
    opt = torch.optim.AdamW(params, lr=torch.tensor(0.0, device=device), fused=True, capturable=device == 'cuda')

    def losses(image, input_ids, attention_mask, alpha):
        return dict(zip(('ita', 'itm', 'lm'), model.losses(image, input_ids, attention_mask, alpha)))
    results = {}
    for mode in ('eager', 'graph'):
        torch.manual_seed(1)
        step = GraphedStep(training_step(losses, opt), opt, warmup=2, graph=mode == 'graph' and device == 'cuda')
        rows = []
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            for _ in range(steps + 2):
                rows.append({k: v.item() for k, v in step(image=image, input_ids=text.input_ids,
                                                            attention_mask=text.attention_mask, alpha=alpha).items()})
        rows = rows[2:]  # after warm-up (graph mode: only replays)
        results[mode] = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    detail = {m: {k: [round(v.mean().item(), 4), round(v.std().item(), 4)] for k, v in r.items()}
              for m, r in results.items()}
    # ITM's negatives are sampled too, so ITM varies without dropout; LM varies only through dropout
    lm_e, lm_g = results['eager']['lm'], results['graph']['lm']
    varies = lm_g.std().item() > 0.25 * lm_e.std().item() and lm_g.std().item() > 0
    unique = len(set(lm_g.tolist())) == len(lm_g)
    label = f'model_lm_loss_varies_between_replays[{size},attn_dropout={attention_dropout},hidden_dropout={hidden_dropout}]'
    _verdict(varies and unique, label, detail, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--json', default='', help='append one JSON line per check to this file')
    p.add_argument('--backends', default='CUDNN_ATTENTION,EFFICIENT_ATTENTION,FLASH_ATTENTION,MATH')
    p.add_argument('--sizes', default='tiny,base', help='model sizes of the model-level check')
    p.add_argument('--cpu-smoke', action='store_true', help='run the model-level check eagerly on the CPU (both '
                   'modes eager: a smoke test of the script, not a check)')
    args = p.parse_args(argv)
    if args.cpu_smoke:
        out: list = []
        model_check(out, steps=3, device='cpu')
        return 0
    if not torch.cuda.is_available():
        print('SKIP graph_dropout_check: no CUDA device', flush=True)
        return 0
    print('torch', torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version(), flush=True)
    out: list = []
    nn_dropout_check(out)
    sdpa_checks(args.backends.split(','), out)
    for size in args.sizes.split(','):
        model_check(out, size)                          # attention dropout alone: SDPA's kernels
    model_check(out, 'tiny', attention_dropout=0.0, hidden_dropout=P)   # nn.Dropout alone
    if args.json:
        with open(args.json, 'a') as f:
            for row in out:
                f.write(json.dumps({'workload': 'graph_dropout_check', **row}) + '\n')
    return 0 if all(r['pass'] for r in out) else 1


if __name__ == '__main__':
    sys.exit(main())
