"""Convert checkpoints between the original BLIP layout (ours) and Hugging Face transformers' BLIP folders.

Import (HF -> ours): ``python -m models.convert_hf path/to/hf_folder_or_file out.pth`` writes
``{'model': state_dict}`` that ``load_checkpoint`` reads (the key map is ``models.hf_layout``).

Export (ours -> HF): ``python -m models.convert_hf --to-hf CKPT DIR [--task caption|retrieval|vqa]`` writes a
``save_pretrained`` folder that ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` /
``BlipForQuestionAnswering`` and ``BlipProcessor`` load offline with ``from_pretrained``:

* ``config.json``: the checkpoint's sizes (read off its tensors, ``models.exportable``) with BLIP's numerics
  (vision LayerNorm eps 1e-6, exact GELU, label smoothing 0.1, ``[DEC]`` bos 30522, ``[SEP]`` 102 ends);
* ``model.safetensors``: the weights, loaded into the HF class strictly first (no missing or unexpected key);
* tokenizer files: bert-base-uncased WordPiece with ``[DEC]`` (bos, 30522) and ``[ENC]`` (30523);
* ``preprocessor_config.json``: resize to the checkpoint's image size (bicubic), CLIP mean/std.

What transformers' classes do differently from ours (same weights, so inputs decide; README "Export"):
``BlipForImageTextRetrieval`` and ``BlipForQuestionAnswering`` feed ``input_ids`` as given, i.e. ``[CLS]``
first from the processor; this project's ITM and VQA put ``[ENC]`` first (set ``input_ids[:, 0] = 30523``
for the same scores and answers). HF's VQA decoder does not mask question padding (our
``mask_question_padding=False``). HF ties the VQA decoder's cross-attention width to the vision width, so a
ViT-L VQA model (decoder reading 768-wide question states) has no HF form and is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

from models.checkpoint import CheckpointError, read_hf_state_dict
from models.exportable import build_loaded, infer_task, read_for_export, write_folder
from models.hf_layout import (HF_CLASS_KIND, HF_KINDS, VISION_SWAPS, blip_to_hf,  # noqa: F401  (import path)
                              blip_to_hf_dropped, hf_config_to_blip_kwargs, hf_to_blip)

HF_CLASSES = {'caption': 'BlipForConditionalGeneration', 'retrieval': 'BlipForImageTextRetrieval',
              'vqa': 'BlipForQuestionAnswering'}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transform/ normalises with these (the original's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_hf_blip(model_or_path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Original-layout state dict from an HF BLIP model instance or a checkpoint path (see
    ``read_hf_state_dict``). Load it with ``models.checkpoint.load_state_dict_checked(model, sd)`` or
    save it with the CLI for ``load_checkpoint``.

    Args:
        dtype: cast floating-point tensors (e.g. ``torch.float32`` for fp16 hub files); None keeps them.
    """
    if isinstance(model_or_path, torch.nn.Module):
        sd = model_or_path.state_dict()
    else:
        sd = read_hf_state_dict(model_or_path)
    sd = hf_to_blip(sd)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ export

def hf_blip_config(task: str, sizes: Mapping):
    """transformers ``BlipConfig`` for our model sizes (``models.exportable.model_sizes``), BLIP's numerics."""
    from transformers import BlipConfig
    vit, med = sizes['vit'], sizes['med_config']
    vision = dict(hidden_size=vit['embed_dim'], intermediate_size=4 * vit['embed_dim'],
                  num_hidden_layers=vit['depth'], num_attention_heads=vit['num_heads'], patch_size=vit['patch_size'],
                  image_size=sizes['image_size'], layer_norm_eps=1e-6, hidden_act='gelu')
    text = dict(vocab_size=med['vocab_size'], hidden_size=med['hidden_size'], encoder_hidden_size=vit['embed_dim'],
                intermediate_size=med['intermediate_size'], num_hidden_layers=med['num_hidden_layers'],
                num_attention_heads=med['num_attention_heads'], max_position_embeddings=med['max_position_embeddings'],
                layer_norm_eps=med['layer_norm_eps'], hidden_act='gelu', label_smoothing=0.1,
                bos_token_id=30522, sep_token_id=102, eos_token_id=102, pad_token_id=med['pad_token_id'])
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=sizes.get('embed_dim', 256),
                      label_smoothing=0.1, architectures=[HF_CLASSES[task]])


def _hf_model(task: str, sizes: Mapping, state_dict: Mapping[str, torch.Tensor], source: str):
    """The HF class of ``task`` holding ``state_dict`` (original layout), every key accounted for."""
    import transformers
    med, width = sizes['med_config'], sizes['vit']['embed_dim']
    if task == 'vqa' and width != med['hidden_size']:
        raise CheckpointError(
            f'{source}: a VQA model with a {width}-wide ViT cannot be exported to transformers: '
            f"BlipForQuestionAnswering gives the answer decoder's cross-attention the vision width ({width}), while "
            f"BLIP's decoder reads the {med['hidden_size']}-wide question states")
    hf_sd = {k: v.detach().clone().contiguous() for k, v in blip_to_hf(state_dict, task).items()}
    with torch.device('meta'):  # no random initialisation of weights that are replaced anyway
        model = getattr(transformers, HF_CLASSES[task])(hf_blip_config(task, sizes))
    result = model.load_state_dict(hf_sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f'{source}: {HF_CLASSES[task]} does not take these weights: missing '
                              f'{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}')
    model.tie_weights()  # the LM head's weight and bias are the embeddings' / the bias (as in the checkpoint)
    _rebuild_meta_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f'{source}: {HF_CLASSES[task]} tensors not set by the checkpoint: {left[:10]}')
    return model.eval()


def _rebuild_meta_buffers(model) -> None:
    """HF's non-persistent ``position_ids`` buffers (not in state dicts) on a model built on the meta device."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name == 'position_ids':
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def hf_processor(image_size: int):
    """``BlipProcessor``: BLIP's tokenizer ([DEC] bos, [ENC]) and image preprocessing at ``image_size``."""
    from transformers import BlipImageProcessor, BlipProcessor
    from transformers.image_utils import PILImageResampling

    from models.blip import init_tokenizer
    images = BlipImageProcessor(size={'height': image_size, 'width': image_size}, resample=PILImageResampling.BICUBIC,
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_resize=True,
                                do_rescale=True, do_normalize=True, do_convert_rgb=True)
    tokenizer = init_tokenizer()
    # saved settings: transformers 5 defaults to no clean-up ("man ' s"), BLIP's 4.15 joined "man's"
    tokenizer.init_kwargs.update(clean_up_tokenization_spaces=True, model_max_length=512)
    tokenizer.model_max_length = 512
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def export_to_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, task: Optional[str] = None,
                 overwrite: bool = False, heads: Optional[tuple] = None) -> dict:
    """Write ``checkpoint`` (ours, official, or an HF folder) as a transformers ``save_pretrained`` folder.

    Args:
        task: 'caption', 'retrieval' or 'vqa'; None infers it from the keys (``models.exportable.infer_task``).
        heads: (vision, text) attention head counts; None: the checkpoint's config, else 64-wide heads.

    Returns:
        {'task', 'class', 'dropped': original-layout keys HF's class has no place for (momentum encoders, ...)}.

    Raises:
        CheckpointError: a key the model needs is missing (named), the task is ambiguous, or no HF class fits.
    """
    source = os.fspath(checkpoint)
    state_dict, config = read_for_export(checkpoint)
    task = task or infer_task(state_dict, source)
    if task not in HF_CLASSES:
        raise CheckpointError(f'--task must be one of {sorted(HF_CLASSES)}, got {task!r}')
    ours, sizes = build_loaded(task, state_dict, config, source, heads)
    kept = ours.state_dict()
    model = _hf_model(task, sizes, kept, source)
    dropped = sorted(set(state_dict) - set(kept))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor = hf_processor(sizes['image_size'])
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json too, for older transformers

    write_folder(Path(out_dir), write, overwrite)
    return {'task': task, 'class': HF_CLASSES[task], 'dropped': dropped}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description='Convert BLIP checkpoints: an HF BLIP checkpoint to the original layout ({"model": state_dict} '
                    '.pth, loadable by load_checkpoint), or with --to-hf a checkpoint to a transformers folder.')
    parser.add_argument('src', help='import: save_pretrained folder, .safetensors or .bin; --to-hf: a BLIP checkpoint')
    parser.add_argument('dst', help='import: output .pth; --to-hf: output folder')
    parser.add_argument('--to-hf', action='store_true', help='export src to a transformers save_pretrained folder')
    parser.add_argument('--task', choices=sorted(HF_CLASSES), default=None,
                        help='--to-hf: which model to write (default: inferred from the keys)')
    parser.add_argument('--overwrite', action='store_true', help='--to-hf: replace a non-empty dst folder')
    parser.add_argument('--vit-heads', type=int, default=None,
                        help="--to-hf: ViT attention heads (default: the checkpoint's config, else width/64)")
    parser.add_argument('--text-heads', type=int, default=None,
                        help="--to-hf: text attention heads (default: the checkpoint's config, else width/64)")
    parser.add_argument('--fp32', action='store_true', help='import: cast floating-point tensors to float32')
    args = parser.parse_args(argv)
    try:
        if args.to_hf:
            info = export_to_hf(args.src, args.dst, args.task, args.overwrite, (args.vit_heads, args.text_heads))
            print(f"wrote {info['class']} ({info['task']}) to {args.dst}"
                  + (f"; {len(info['dropped'])} keys it has no place for left out (e.g. {info['dropped'][:3]})"
                     if info['dropped'] else ''))
            return
        sd = load_hf_blip(args.src, torch.float32 if args.fp32 else None)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f'error: {e}')
    tmp = f'{args.dst}.{os.getpid()}.tmp'  # this writer's own temp file
    torch.save({'model': sd}, tmp)
    os.replace(tmp, args.dst)  # never leave a half-written checkpoint behind
    print(f'wrote {len(sd)} tensors to {args.dst}')


if __name__ == '__main__':
    main()
