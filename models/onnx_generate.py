"""Caption images with an ONNX caption export (``models.export_onnx --task caption``) on onnxruntime.

The decoding is this project's own (``models.generation.generate``: the same beam search, greedy and nucleus
sampling, the same tokens as ``BLIP_Decoder.generate`` on the same weights); only the network runs on
onnxruntime: the image encoder, every layer's cross-attention keys/values once per image, then one
``decoder_step`` call per token with the self-attention cache passed in and out.

    python -m models.onnx_generate DIR image.jpg [image2.jpg ...] [--num-beams 3 --max-length 20 --min-length 5]

    captioner = OnnxCaptioner('blip_onnx', threads=2)
    captioner.generate(pixel_values, num_beams=3, max_length=20, min_length=5)   # -> list of captions
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from models import generation


def _session(path: Path, threads: Optional[int], providers: Optional[Sequence[str]], spin: bool = True):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:  # idle worker threads sleep instead of spinning: kinder to a CPU shared with other jobs
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=list(providers or ['CPUExecutionProvider']))


class OnnxStep:
    """``models.generation`` step runner over ``decoder_step.onnx``: the self-attention cache lives in numpy
    arrays (``present_*`` of one step are the next step's ``past_*``); beams are followed by gathering rows."""

    def __init__(self, session, cross_k: np.ndarray, cross_v: np.ndarray, num_layers: int, num_heads: int,
                 head_dim: int):
        self.session, self.cross_k, self.cross_v = session, cross_k, cross_v
        self.shape = (num_layers, 0, num_heads, 0, head_dim)
        self.past_k = self.past_v = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.past_k is None:  # the prompt: an empty cache for its R rows
            shape = list(self.shape)
            shape[1] = input_ids.shape[0]
            self.past_k = self.past_v = np.zeros(shape, dtype=self.cross_k.dtype)
            new = input_ids
        else:
            new = input_ids[:, -1:]
        logits, self.past_k, self.past_v = self.session.run(None, {
            'input_ids': new.cpu().numpy(), 'past_k': self.past_k, 'past_v': self.past_v,
            'cross_k': self.cross_k, 'cross_v': self.cross_v})
        return torch.from_numpy(logits)

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.cpu().numpy()
        self.past_k = np.take(self.past_k, rows, axis=1)
        self.past_v = np.take(self.past_v, rows, axis=1)


class OnnxCaptioner:
    """The three caption graphs of an export folder, with its tokenizer and settings (``export.json``)."""

    def __init__(self, folder: str | Path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 spin: bool = True):
        from models.blip import init_tokenizer
        self.folder = Path(folder)
        manifest_path = self.folder / 'export.json'
        if not manifest_path.is_file():
            raise FileNotFoundError(f'{manifest_path}: not an ONNX export folder (run models.export_onnx first)')
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest['task'] != 'caption':
            raise ValueError(f"{self.folder}: exported for task {self.manifest['task']!r}, not 'caption'")
        files = self.manifest['files']
        self.image_encoder, self.cross_kv, self.step = (
            _session(self.folder / files[name]['file'], threads, providers, spin)
            for name in ('image_encoder', 'decoder_cross_kv', 'decoder_step'))
        self.tokenizer = init_tokenizer(str(self.folder))
        self.image_size = self.manifest['image_size']

    def prompt_ids(self, batch_size: int, prompt: Optional[str] = None) -> torch.Tensor:
        """``[DEC] a picture of`` per image ([B, P]), as ``BLIP_Decoder.prompt_ids``."""
        ids = self.tokenizer([prompt or self.manifest['prompt']] * batch_size, return_tensors='pt').input_ids
        ids[:, 0] = self.manifest['bos_token_id']
        return ids[:, :-1]

    def generate_ids(self, pixel_values, prompt: Optional[str] = None, **kwargs) -> torch.Tensor:
        """Token ids [B * num_return_sequences, T] by ``models.generation.generate`` (same keyword arguments)."""
        pixel_values = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        (image_embeds,) = self.image_encoder.run(['image_embeds'], {'pixel_values': pixel_values})
        cross_k, cross_v = self.cross_kv.run(None, {'image_embeds': image_embeds})
        m = self.manifest
        runner = OnnxStep(self.step, cross_k, cross_v, m['num_layers'], m['num_heads'], m['head_dim'])
        return generation.generate(None, self.prompt_ids(pixel_values.shape[0], prompt), None, step_runner=runner,
                                   eos_token_id=m['sep_token_id'], pad_token_id=m['pad_token_id'], **kwargs)

    def generate(self, pixel_values, sample: bool = False, num_beams: int = 3, max_length: int = 30,
                 min_length: int = 10, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 num_return_sequences: int = 1, top_k: int = 50, prompt: Optional[str] = None) -> list[str]:
        """Captions, with ``BLIP_Decoder.generate``'s arguments and defaults (sampling: repetition penalty 1.1)."""
        prompt = prompt if prompt is not None else self.manifest['prompt']
        ids = self.generate_ids(pixel_values, prompt, sample=sample, num_beams=1 if sample else num_beams,
                                max_length=max_length, min_length=min_length, top_p=top_p, top_k=top_k,
                                repetition_penalty=1.1 if sample else repetition_penalty,
                                num_return_sequences=num_return_sequences)
        return [self.tokenizer.decode(row, skip_special_tokens=True)[len(prompt):] for row in ids.tolist()]


def main(argv: Optional[list[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', help='output folder of models.export_onnx --task caption')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--num-beams', type=int, default=3)
    parser.add_argument('--max-length', type=int, default=20)
    parser.add_argument('--min-length', type=int, default=5)
    parser.add_argument('--sample', action='store_true', help='nucleus sampling instead of beam search')
    parser.add_argument('--threads', type=int, default=None, help='onnxruntime intra-op threads (default: all)')
    parser.add_argument('--no-spin', action='store_true', help='idle onnxruntime threads sleep (shared CPUs)')
    args = parser.parse_args(argv)
    from predict import load_image
    try:
        captioner = OnnxCaptioner(args.folder, args.threads, spin=not args.no_spin)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    pixels = torch.cat([load_image(path, captioner.image_size, 'cpu') for path in args.images])
    captions = captioner.generate(pixels.numpy(), sample=args.sample, num_beams=args.num_beams,
                                  max_length=args.max_length, min_length=args.min_length)
    for path, caption in zip(args.images, captions):
        print(json.dumps({'image': path, 'caption': caption}))
    return captions


if __name__ == '__main__':
    main()
