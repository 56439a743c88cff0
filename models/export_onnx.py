"""Export BLIP to ONNX: the image encoder, the text encoder / ITM head, and the caption decoder as a step model.

    python -m models.export_onnx CKPT DIR --task caption|feature|itm [--opset 18]

Files written to DIR (fp32, dynamic batch and text-length axes; the image size is the checkpoint's):

==========================  =========================================================================
``image_encoder.onnx``      pixel_values [B,3,S,S] -> image_embeds [B,N,Dv] (+ image_feat [B,E], L2-normalised
                            ITC projection, when the checkpoint has ``vision_proj``)
``decoder_cross_kv.onnx``   caption: image_embeds [B,N,Dv] -> cross_k, cross_v [layers,B,h,N,d]: every layer's
                            cross-attention keys/values, computed once per image
``decoder_step.onnx``       caption: input_ids [R,L], past_k, past_v [layers,R,h,P,d] (P may be 0), cross_k,
                            cross_v -> logits [R,V] (last position), present_k, present_v [layers,R,h,P+L,d].
                            R = r*B text rows, grouped per image (beams): row j reads image j // r, whose
                            keys/values are never copied per row
``text_encoder.onnx``       feature/itm: input_ids, attention_mask [B,L] -> text_embeds [B,L,H] (+ text_feat [B,E])
``itm.onnx``                itm: input_ids, attention_mask [B,L], image_embeds [B,N,Dv] -> itm_logits [B,2]
                            (pair b = image b with text b; put [ENC] first, as this project's ITM does)
``export.json``             task, opset, files with their input/output names, sizes and special token ids
tokenizer files             BLIP's WordPiece with [DEC] and [ENC] (``models.blip.init_tokenizer`` reads them)
==========================  =========================================================================

``models/onnx_generate.py`` captions with these files on onnxruntime by this project's beam search
(``models.generation``). Export checks every file against PyTorch on the export inputs (max |diff| <= 1e-4)
before the folder is written; the checkpoint must have every key its task needs (missing ones are named).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import med
from models.checkpoint import CheckpointError
from models.exportable import build_loaded, read_for_export, write_folder
from models.med import attention

TASKS = ('caption', 'feature', 'itm')
OPSET = 18  # onnxruntime >= 1.14 and TensorRT 8.6+ run it
TOLERANCE = 1e-4


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """MED's linear layers as ``F.linear`` while tracing: its skinny-CPU kernel choice branches on the row count
    (a dynamic axis in the graph) and calls a oneDNN op that has no ONNX form."""
    saved = med.skinny_cpu_linear
    med.skinny_cpu_linear = lambda *args: None
    try:
        yield
    finally:
        med.skinny_cpu_linear = saved


# ------------------------------------------------------------------------------------------ graphs

class ImageEncoder(nn.Module):
    def __init__(self, visual_encoder: nn.Module, vision_proj: Optional[nn.Module] = None):
        super().__init__()
        self.visual_encoder, self.vision_proj = visual_encoder, vision_proj

    def forward(self, pixel_values: torch.Tensor):
        embeds = self.visual_encoder(pixel_values)                                  # [B,N,Dv]
        if self.vision_proj is None:
            return embeds
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)         # [B,E]


class CrossKV(nn.Module):
    """Every decoder layer's cross-attention keys and values of the image tokens, stacked."""

    def __init__(self, bert: med.MED):
        super().__init__()
        self.bert = bert

    def forward(self, image_embeds: torch.Tensor):
        kv = self.bert.precompute_cross_kv(image_embeds)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])    # [layers,B,h,N,d] each


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [R,h,L,d] of R = r*B rows against one image's k, v [B,h,N,d] per r rows -> [R,L,h*d]."""
    R, h, L, d = q.shape
    B = k.shape[0]
    q = q.transpose(1, 2).reshape(B, -1, h, d).transpose(1, 2)                     # [B,h,r*L,d]
    out = attention(q, k, v)
    return out.transpose(1, 2).reshape(R, L, h * d)


class DecoderStep(nn.Module):
    """One decoding step of the caption decoder with explicit caches (same function as ``generation._Decoder``).

    Causal self-attention over past + new tokens (positions continue from the past length), cross-attention
    with precomputed keys/values shared by each image's rows, LM head on the last position only.
    """

    def __init__(self, decoder: med.MEDLMHeadModel):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, past_k, past_v, cross_k, cross_v):
        bert = self.decoder.bert
        R, L = input_ids.shape
        P = past_k.shape[3]
        positions = torch.arange(L, device=input_ids.device) + P
        x = bert.embeddings(input_ids, position_ids=positions[None])                 # [R,L,H]
        visible = torch.arange(P + L, device=input_ids.device)[None] <= positions[:, None]   # [L,P+L]
        mask = torch.zeros(visible.shape, dtype=x.dtype).masked_fill(~visible, float('-inf'))
        keys, values = [], []
        for i, layer in enumerate(bert.encoder.layer):
            sa = layer.attention.self
            q, k, v = sa.project_qkv(x)                                              # [R,h,L,d]
            k, v = torch.cat([past_k[i], k], 2), torch.cat([past_v[i], v], 2)        # [R,h,P+L,d]
            keys.append(k)
            values.append(v)
            h = attention(q, k, v, mask)
            x = layer.attention.output(h.transpose(1, 2).reshape(R, L, -1), x)
            ca = layer.crossattention
            cq = ca.self.split_heads(ca.self.query(x))
            x = ca.output(_grouped_attention(cq, cross_k[i], cross_v[i]), x)
            x = layer.output(layer.intermediate(x), x)
        logits = self.decoder.cls(x[:, -1]).float()                                  # [R,V]
        return logits, torch.stack(keys), torch.stack(values)


class TextEncoder(nn.Module):
    def __init__(self, text_encoder: med.MED, text_proj: Optional[nn.Module] = None):
        super().__init__()
        self.text_encoder, self.text_proj = text_encoder, text_proj

    def forward(self, input_ids, attention_mask):
        embeds = self.text_encoder(input_ids, attention_mask=attention_mask, mode='text').last_hidden_state
        if self.text_proj is None:
            return embeds
        return embeds, F.normalize(self.text_proj(embeds[:, 0]), dim=-1)


class ITM(nn.Module):
    def __init__(self, text_encoder: med.MED, itm_head: nn.Module):
        super().__init__()
        self.text_encoder, self.itm_head = text_encoder, itm_head

    def forward(self, input_ids, attention_mask, image_embeds):
        out = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                mode='multimodal')
        return self.itm_head(out.last_hidden_state[:, 0])                           # [B,2]


# ------------------------------------------------------------------------------------------ export

def _export(module: nn.Module, args: tuple, path: Path, input_names: list, output_names: list,
            dynamic_shapes: tuple, opset: int) -> None:
    with plain_linear(), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*axis name.*will not be used')  # axes shared by inputs
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True,
                                    verbose=False, report=False)
    program.save(str(path))  # weights go to an external-data file only past protobuf's 2 GB


def _check(path: Path, module: nn.Module, args: tuple, input_names: list, output_names: list) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs; refuses the export above ``TOLERANCE``."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(output_names, {n: a.numpy() for n, a in zip(input_names, args)})
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    err = max(float((torch.from_numpy(g) - w.float()).abs().max()) for g, w in zip(got, want))
    if not err <= TOLERANCE:
        raise CheckpointError(f'{path.name}: onnxruntime differs from PyTorch by {err:.2e} (> {TOLERANCE})')
    return err


def _example_inputs(sizes: dict, task: str, tokenizer) -> dict:
    """Inputs at the sizes the graphs are traced with: batch and lengths >= 2 (torch.export keeps 0/1 static)."""
    g = torch.Generator().manual_seed(0)
    S = sizes['image_size']
    pixel = torch.randn(2, 3, S, S, generator=g)
    text = tokenizer(['a dog on a red sofa', 'two people'], padding='longest', return_tensors='pt')
    return {'pixel_values': pixel, 'input_ids': text.input_ids, 'attention_mask': text.attention_mask}


def export_task(model: nn.Module, sizes: dict, task: str, out: Path, opset: int = OPSET) -> dict:
    """Write the ONNX files of ``task`` for ``model`` (ours, eval, fp32) into ``out``; returns the manifest."""
    B, L = torch.export.Dim('batch'), torch.export.Dim('length')
    ex = _example_inputs(sizes, task, model.tokenizer)
    files, errors = {}, {}

    def add(name, module, args, inputs, outputs, dynamic):
        path = out / f'{name}.onnx'
        _export(module, args, path, inputs, outputs, dynamic, opset)
        errors[name] = _check(path, module, args, inputs, outputs)
        files[name] = {'file': path.name, 'inputs': inputs, 'outputs': outputs}

    proj = getattr(model, 'vision_proj', None) if task != 'caption' else None
    image = ImageEncoder(model.visual_encoder, proj).eval()
    add('image_encoder', image, (ex['pixel_values'],), ['pixel_values'],
        ['image_embeds', 'image_feat'] if proj is not None else ['image_embeds'], ({0: B},))
    with torch.no_grad():
        image_embeds = model.visual_encoder(ex['pixel_values'])
    manifest = {'task': task, 'opset': opset, 'image_size': sizes['image_size'], 'vit': sizes['vit'],
                'med_config': sizes['med_config'], 'pad_token_id': model.tokenizer.pad_token_id,
                'sep_token_id': model.tokenizer.sep_token_id, 'bos_token_id': model.tokenizer.bos_token_id,
                'enc_token_id': model.tokenizer.enc_token_id, 'cls_token_id': model.tokenizer.cls_token_id}
    if task == 'caption':
        decoder = model.text_decoder
        add('decoder_cross_kv', CrossKV(decoder.bert).eval(), (image_embeds,), ['image_embeds'],
            ['cross_k', 'cross_v'], ({0: B},))
        with torch.no_grad():
            cross_k, cross_v = CrossKV(decoder.bert)(image_embeds)
        cfg = decoder.config
        R, P, T = torch.export.Dim('rows'), torch.export.Dim('past', min=0), torch.export.Dim('new', max=4096)
        rows = 2 * image_embeds.shape[0]  # two rows per image: the grouped cross-attention is traced too
        ids = torch.randint(1000, 2000, (rows, 3), generator=torch.Generator().manual_seed(1))
        past = torch.randn(cfg.num_hidden_layers, rows, cfg.num_attention_heads, 2, cfg.head_dim,
                           generator=torch.Generator().manual_seed(2))
        add('decoder_step', DecoderStep(decoder).eval(), (ids, past, past.clone(), cross_k, cross_v),
            ['input_ids', 'past_k', 'past_v', 'cross_k', 'cross_v'], ['logits', 'present_k', 'present_v'],
            ({0: R, 1: T}, {1: R, 3: P}, {1: R, 3: P}, {1: B}, {1: B}))
        manifest.update(prompt=model.prompt, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                        head_dim=cfg.head_dim)
    else:
        tproj = getattr(model, 'text_proj', None)
        text_args = (ex['input_ids'], ex['attention_mask'])
        add('text_encoder', TextEncoder(model.text_encoder, tproj).eval(), text_args, ['input_ids', 'attention_mask'],
            ['text_embeds', 'text_feat'] if tproj is not None else ['text_embeds'], ({0: B, 1: L}, {0: B, 1: L}))
        if task == 'itm':
            ids = ex['input_ids'].clone()
            ids[:, 0] = model.tokenizer.enc_token_id
            add('itm', ITM(model.text_encoder, model.itm_head).eval(), (ids, ex['attention_mask'], image_embeds),
                ['input_ids', 'attention_mask', 'image_embeds'], ['itm_logits'], ({0: B, 1: L}, {0: B, 1: L}, {0: B}))
    manifest['files'] = files
    manifest['max_abs_diff_vs_pytorch'] = errors
    return manifest


def export_onnx(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, task: str, opset: int = OPSET,
                overwrite: bool = False, heads: Optional[tuple] = None) -> dict:
    """Export ``checkpoint`` (ours, official layout or an HF folder) for ``task``; returns the manifest.

    Raises:
        CheckpointError: missing keys (named), a non-empty ``out_dir`` without ``overwrite``, or an ONNX file
            whose onnxruntime outputs differ from PyTorch's by more than 1e-4.
    """
    if task not in TASKS:
        raise CheckpointError(f'--task must be one of {TASKS}, got {task!r}')
    source = os.fspath(checkpoint)
    state_dict, config = read_for_export(checkpoint)
    model, sizes = build_loaded(task, state_dict, config, source, heads)
    model = model.float()
    manifest = {}

    def write(tmp: Path) -> None:
        manifest.update(export_task(model, sizes, task, tmp, opset))
        model.tokenizer.save_pretrained(tmp)
        (tmp / 'export.json').write_text(json.dumps(manifest, indent=1))

    write_folder(Path(out_dir), write, overwrite)
    return manifest


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help="a BLIP checkpoint (.pth: ours or the official ones; or an HF folder)")
    parser.add_argument('out_dir')
    parser.add_argument('--task', choices=TASKS, required=True)
    parser.add_argument('--opset', type=int, default=OPSET)
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty out_dir')
    parser.add_argument('--vit-heads', type=int, default=None, help="default: the checkpoint's config, else width/64")
    parser.add_argument('--text-heads', type=int, default=None, help="default: the checkpoint's config, else width/64")
    args = parser.parse_args(argv)
    try:
        manifest = export_onnx(args.checkpoint, args.out_dir, args.task, args.opset, args.overwrite,
                               (args.vit_heads, args.text_heads))
    except (CheckpointError, FileNotFoundError, ImportError) as e:
        sys.exit(f'error: {e}')
    diffs = ', '.join(f'{k} {v:.1e}' for k, v in manifest['max_abs_diff_vs_pytorch'].items())
    print(f"wrote {len(manifest['files'])} ONNX files (opset {args.opset}) to {args.out_dir}; "
          f'max |onnxruntime - PyTorch|: {diffs}')
    return manifest


if __name__ == '__main__':
    main()
