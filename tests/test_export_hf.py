"""Export to transformers (``python -m models.convert_hf --to-hf``): every task's folder loads offline into its
HF class and ``BlipProcessor`` with no missing/unexpected keys, gives this project's outputs on the same weights
(greedy caption tokens, ITM/ITC scores within 1e-4, VQA answers), converts back bitwise, and refuses a
checkpoint that lacks keys, naming them. Tiny models; ViT-L is stood in for by a vision tower wider than the
text side (48 vs 32, 3 heads), other image sizes by 48 px."""
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip('transformers')
from transformers import (BlipForConditionalGeneration, BlipForImageTextRetrieval,  # noqa: E402
                          BlipForQuestionAnswering, BlipProcessor)

from models.blip import BLIP_Decoder  # noqa: E402
from models.blip_itm import BLIP_ITM  # noqa: E402
from models.blip_vqa import BLIP_VQA  # noqa: E402
from models.convert_hf import export_to_hf, main as convert_main  # noqa: E402
from models.exportable import ExportError, infer_task  # noqa: E402
from models.generation import generate  # noqa: E402
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT, WIDE_VIT, randomize, save_tiny as save  # noqa: E402

DEC, ENC, SEP = 30522, 30523, 102
REF = Path(__file__).parent / 'reference_keys'


def pil_images(n: int, size: int = 50, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size + 7, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def load_hf(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched keys
    return model.eval()


def round_trip(folder: Path, ckpt: Path, tmp_path: Path, dropped: list) -> None:
    """HF folder -> original layout again: every kept tensor bitwise equal, only the reported keys gone."""
    convert_main([str(folder), str(tmp_path / 'back.pth')])
    back = torch.load(tmp_path / 'back.pth', weights_only=True)['model']
    original = torch.load(ckpt, weights_only=True)['model']
    assert set(back) == set(original) - set(dropped)
    for k, v in back.items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k


# ------------------------------------------------------------------------------------------ caption

@pytest.mark.parametrize('vit,image_size', [(TINY_VIT, TINY_IMAGE), (WIDE_VIT, 48)])
def test_caption_export_loads_and_generates_the_same_greedy_tokens(tmp_path, vit, image_size):
    ours = randomize(BLIP_Decoder(med_config=dict(TINY_MED), image_size=image_size, vit=dict(vit)))
    ckpt = save(ours, tmp_path / 'caption.pth', vit, image_size)
    convert_main(['--to-hf', str(ckpt), str(tmp_path / 'hf')])  # task inferred: text_decoder only
    hf = load_hf(BlipForConditionalGeneration, tmp_path / 'hf')
    processor = BlipProcessor.from_pretrained(tmp_path / 'hf')
    assert hf.config.vision_config.image_size == image_size and hf.config.vision_config.hidden_size == vit['embed_dim']
    tok = processor.tokenizer
    assert (len(tok), tok.convert_tokens_to_ids('[DEC]'), tok.convert_tokens_to_ids('[ENC]'), tok.bos_token) == \
        (30524, DEC, ENC, '[DEC]')
    ids = ours.tokenizer("[DEC] a man's dog, isn't it?").input_ids
    assert tok("[DEC] a man's dog, isn't it?").input_ids == ids
    assert tok.decode(ids, skip_special_tokens=True) == ours.tokenizer.decode(ids, skip_special_tokens=True) == \
        "a man's dog, isn't it?"
    assert (tmp_path / 'hf' / 'preprocessor_config.json').is_file()
    ip = processor.image_processor
    assert ip.size == {'height': image_size, 'width': image_size} and int(ip.resample) == 3  # bicubic
    assert tuple(ip.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tuple(ip.image_std) == pytest.approx((0.26862954, 0.26130258, 0.27577711))

    inputs = processor(images=pil_images(3), text=['a picture of '] * 3, return_tensors='pt')
    assert inputs.pixel_values.shape == (3, 3, image_size, image_size)
    with torch.no_grad():
        theirs = hf.generate(**inputs, num_beams=1, do_sample=False, max_length=12, min_length=5)
        prompt = ours.prompt_ids(3, 'cpu')
        mine = generate(ours.text_decoder, prompt, ours.visual_encoder(inputs.pixel_values), max_length=12,
                        min_length=5)
    assert prompt[0].tolist() == [DEC, 1037, 3861, 1997]  # the processor's ids with [DEC] first, as HF does
    cut = [r[:r.index(SEP) + 1] if SEP in r else r for r in (row.tolist() for row in theirs)]
    assert [[t for t in r if t] for r in mine.tolist()] == cut
    round_trip(tmp_path / 'hf', ckpt, tmp_path, [])
    export_to_hf(tmp_path / 'hf', tmp_path / 'hf2')  # an HF folder exports again (heads from its config.json)
    assert load_hf(BlipForConditionalGeneration, tmp_path / 'hf2').config.to_dict()['text_config'] == \
        hf.config.to_dict()['text_config']


# ------------------------------------------------------------------------------------------ retrieval

@pytest.mark.parametrize('vit,image_size', [(TINY_VIT, TINY_IMAGE), (WIDE_VIT, 48)])
def test_retrieval_export_gives_our_itm_and_itc_scores(tmp_path, vit, image_size):
    ours = randomize(BLIP_ITM(med_config=dict(TINY_MED), image_size=image_size, vit=dict(vit)), seed=1)
    ckpt = save(ours, tmp_path / 'itm.pth', vit, image_size)
    info = export_to_hf(ckpt, tmp_path / 'hf', task='retrieval')
    assert info['dropped'] == []
    hf = load_hf(BlipForImageTextRetrieval, tmp_path / 'hf')
    processor = BlipProcessor.from_pretrained(tmp_path / 'hf')
    captions = ['a dog on a red sofa', 'two people', 'a very long caption about a bicycle leaning on a wall']
    inputs = processor(images=pil_images(3, seed=1), text=captions, padding='max_length', max_length=35,
                       return_tensors='pt')
    enc_ids = inputs.input_ids.clone()
    enc_ids[:, 0] = ENC  # this project's ITM reads [ENC] first (README "Export")
    with torch.no_grad():
        itm = hf(input_ids=enc_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                 use_itm_head=True).itm_score
        itm_cls = hf(**inputs, use_itm_head=True).itm_score
        itc = hf(**inputs, use_itm_head=False).itm_score
        mine = ours(inputs.pixel_values, captions, match_head='itm')
        mine_cls = ours(inputs.pixel_values, captions, match_head='itm', itm_first_token='cls')
        mine_itc = ours(inputs.pixel_values, captions, match_head='itc')
    assert (itm - mine).abs().max() < 1e-4 and (itm_cls - mine_cls).abs().max() < 1e-4
    assert (itc - mine_itc).abs().max() < 1e-4
    assert (itm - itm_cls).abs().max() > 1e-3  # the first token matters: the check above is not vacuous
    round_trip(tmp_path / 'hf', ckpt, tmp_path, [])


# ------------------------------------------------------------------------------------------ VQA

def test_vqa_export_gives_our_answers(tmp_path):
    ours = randomize(BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)), seed=2)
    with torch.no_grad():  # few live words and an [SEP] that competes: short, varied answers
        bias = ours.text_decoder.cls.predictions.bias
        bias.fill_(-30)
        bias[[1000, 1001, 1002, 1003, 1004, 1005]] = 0
        bias[SEP] = 1.0
    ckpt = save(ours, tmp_path / 'vqa.pth')
    convert_main(['--to-hf', str(ckpt), str(tmp_path / 'hf')])  # inferred: encoder + decoder, no ITM head
    hf = load_hf(BlipForQuestionAnswering, tmp_path / 'hf')
    processor = BlipProcessor.from_pretrained(tmp_path / 'hf')
    questions = ['what is on the sofa?', 'how many?', 'is the bicycle leaning on a wall or on a tree?']
    inputs = processor(images=pil_images(3, seed=2), text=questions, padding=True, return_tensors='pt')
    ids = inputs.input_ids.clone()
    ids[:, 0] = ENC
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
                             num_beams=1, do_sample=False, max_length=10, min_length=1)
        mine = ours(inputs.pixel_values, questions, train=False, inference='generate', num_beams=1,
                    mask_question_padding=False)
    assert mine == processor.batch_decode(theirs, skip_special_tokens=True)
    assert len(set(mine)) > 1
    round_trip(tmp_path / 'hf', ckpt, tmp_path, [])


def test_vit_l_style_vqa_is_refused_with_the_reason(tmp_path):
    ours = BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(WIDE_VIT))
    ckpt = save(ours, tmp_path / 'vqa.pth', WIDE_VIT)
    with pytest.raises(SystemExit, match='48-wide ViT cannot be exported'):
        convert_main(['--to-hf', str(ckpt), str(tmp_path / 'hf')])
    assert not (tmp_path / 'hf').exists()


# ------------------------------------------------------------------------------------------ official layout

def official_keys(name: str) -> list[str]:
    """Official key names of ``reference_keys/name.txt`` cut to the tiny depth (2 blocks, 2 layers)."""
    keys = [line.split('\t')[0] for line in (REF / f'{name}.txt').read_text().splitlines() if not line.startswith('#')]
    return [k for k in keys if not re.search(r'\.(blocks|layer)\.([2-9]|1\d)\.', k)]


def official_layout(model: torch.nn.Module, name: str) -> dict:
    """A state dict with exactly the official key set: our tiny model's tensors, zeros for what it lacks."""
    own = model.state_dict()
    return {k: own[k].clone() if k in own else torch.zeros(1) for k in official_keys(name)}


def test_official_retrieval_checkpoint_layout_exports_dropping_momentum_and_queues(tmp_path):
    ours = randomize(BLIP_ITM(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)), seed=3)
    sd = official_layout(ours, 'retrieval')
    assert set(ours.state_dict()) < set(sd)  # the official file has our keys plus momentum encoders and queues
    torch.save({'model': sd}, tmp_path / 'model_base_retrieval_coco.pth')  # no config entry, as the official files
    with pytest.raises(ExportError, match='--vit-heads'):  # 16-wide tiny heads: the count cannot be guessed
        export_to_hf(tmp_path / 'model_base_retrieval_coco.pth', tmp_path / 'hf')
    info = export_to_hf(tmp_path / 'model_base_retrieval_coco.pth', tmp_path / 'hf', heads=(2, 2))
    assert info['task'] == 'retrieval'
    assert set(info['dropped']) == set(sd) - set(ours.state_dict())
    assert {'temp', 'image_queue', 'text_queue', 'idx_queue', 'ptr_queue',
            'visual_encoder_m.cls_token'} <= set(info['dropped'])
    hf = load_hf(BlipForImageTextRetrieval, tmp_path / 'hf')
    for k, v in hf.state_dict().items():
        if k.startswith('text_encoder.encoder.layer.0.attention.self.query'):
            assert torch.equal(v, sd[k])


def test_official_caption_and_vqa_layouts_infer_their_task():
    cap = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    vqa = BLIP_VQA(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    assert infer_task(official_layout(cap, 'decoder')) == 'caption'
    assert infer_task(official_layout(vqa, 'vqa')) == 'vqa'
    with pytest.raises(ExportError, match='--task caption'):
        infer_task(dict.fromkeys(official_keys('pretrain'), torch.zeros(1)))


def test_pretrain_checkpoint_exports_each_task_when_asked(tmp_path):
    """A pretraining checkpoint holds every module: ``--task`` picks the model; heads come from its config."""
    from models.blip_pretrain import BLIP_Pretrain
    model = BLIP_Pretrain(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT), queue_size=8)
    ckpt = save(model, tmp_path / 'pretrain.pth')
    with pytest.raises(SystemExit, match='--task caption'):
        convert_main(['--to-hf', str(ckpt), str(tmp_path / 'x')])
    for task, cls in (('caption', BlipForConditionalGeneration), ('retrieval', BlipForImageTextRetrieval)):
        convert_main(['--to-hf', str(ckpt), str(tmp_path / task), '--task', task])
        load_hf(cls, tmp_path / task)


# ------------------------------------------------------------------------------------------ refusals

def test_export_of_a_checkpoint_with_missing_keys_is_refused_naming_them(tmp_path):
    ours = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    gone = ['text_decoder.bert.encoder.layer.1.crossattention.self.key.weight', 'visual_encoder.norm.bias']
    save(ours, tmp_path / 'broken.pth', drop=gone)
    with pytest.raises(SystemExit) as e:
        convert_main(['--to-hf', str(tmp_path / 'broken.pth'), str(tmp_path / 'hf')])
    message = str(e.value)
    assert 'lacks 2 key(s)' in message and all(k in message for k in gone) and 'broken.pth' in message
    assert not (tmp_path / 'hf').exists()


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    ours = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    ckpt = save(ours, tmp_path / 'c.pth')
    (tmp_path / 'hf').mkdir()
    (tmp_path / 'hf' / 'keep.txt').write_text('mine')
    with pytest.raises(SystemExit, match='not empty'):
        convert_main(['--to-hf', str(ckpt), str(tmp_path / 'hf')])
    assert (tmp_path / 'hf' / 'keep.txt').read_text() == 'mine'
    convert_main(['--to-hf', str(ckpt), str(tmp_path / 'hf'), '--overwrite'])
    assert (tmp_path / 'hf' / 'config.json').is_file() and not (tmp_path / 'hf' / 'keep.txt').exists()


def test_checkpoint_reading_does_not_import_the_converters():
    """The key map lives in models/hf_layout.py: models.checkpoint (which reads HF files) no longer imports
    models.convert_hf, which imports it (an import cycle, even when one side was imported lazily)."""
    import ast

    def imports(module: str) -> set:
        tree = ast.parse((Path(__file__).parent.parent / 'models' / f'{module}.py').read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return {m.split('.', 1)[1] for m in found if m.startswith('models.')}

    seen, todo = set(), ['checkpoint']
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [m for m in imports(module) if (Path(__file__).parent.parent / 'models' / f'{m}.py').is_file()]
    assert 'convert_hf' not in seen and 'exportable' not in seen and 'hf_layout' in seen
