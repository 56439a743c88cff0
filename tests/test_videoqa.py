"""Zero-shot video QA: frame sampling, the frames' token concatenation against a per-frame reference loop,
eval_videoqa.py end to end in both inference modes, bad input, and (learning) a toy VQA model answering
toy video questions better than the best video-blind answer."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import eval_videoqa
from data.loading import AnnotationError
from data.toy import ensure_toy_dataset
from data.video_dataset import read_frames, sample_frame_indices
from data.videoqa_dataset import videoqa_dataset
from engine.vqa_eval import vqa_accuracy
from models.blip_vqa import blip_vqa
from models.video_qa import answer_video_questions, encode_video, tokenize_candidates
from tests.tiny import TINY_MED, TINY_VIT
from tests.toy_runs import ROOT, run


@pytest.fixture(scope='module')
def toy(module_dir) -> Path:
    return ensure_toy_dataset(module_dir('toy'), n_train=4, n_val=2, n_test=2, n_web=2, n_videos=2, video_frames=2,
                              n_videoqa=6)


def toy_options(toy: Path) -> list[str]:
    return [f'toy_root={toy}', f'video_root={toy}/videos', f'test_file={toy}/annotation/videoqa_test.json',
            f'answer_list={toy}/annotation/videoqa_answer_list.json', 'num_workers=0']


def tiny_vqa():
    torch.manual_seed(0)
    return blip_vqa(med_config=TINY_MED, vit=TINY_VIT, image_size=32).eval()


def test_sixteen_frames_are_sampled_uniformly_and_decoded_as_a_reference_loop(toy):
    path = str(toy / 'videos' / 'qa_video0.mp4')
    assert sample_frame_indices(16, 16, 'uniform') == list(range(16))
    assert sample_frame_indices(160, 16, 'uniform') == list(range(0, 160, 10))
    with av.open(path) as container:                  # reference: decode every frame, pick the sampled ones
        every = [f.to_ndarray(format='rgb24', width=32, height=32) for f in container.decode(video=0)]
    for num_frm in (16, 8, 5):
        wanted = sample_frame_indices(len(every), num_frm, 'uniform')
        np.testing.assert_array_equal(read_frames(path, num_frm, 'uniform', 32), np.stack([every[i] for i in wanted]))


def test_frame_tokens_are_concatenated_in_frame_order_like_a_per_frame_loop():
    model = tiny_vqa()
    video = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        reference = torch.stack([torch.cat([model.visual_encoder(v[f:f + 1])[0] for f in range(5)]) for v in video])
        for chunk in (1, 3, 64):                      # chunks straddling videos give the same tokens
            torch.testing.assert_close(encode_video(model.visual_encoder, video, chunk), reference,
                                       rtol=1e-5, atol=1e-5)
    assert reference.shape == (2, 5 * 17, 32)


def test_a_one_frame_video_is_answered_as_the_image_vqa_model_answers_the_frame():
    model = tiny_vqa()
    image = torch.randn(3, 3, 32, 32)
    questions = ['what color is it?', 'is there a circle?', 'how many?']
    answers = ['red', 'yes', 'no', 'two', 'a blue square']
    with torch.no_grad():
        ids, atts = tokenize_candidates(model, answers, image.device)
        ranked = model(image, questions, {'input_ids': ids, 'attention_mask': atts}, train=False, inference='rank',
                       k_test=3)
        generated = model(image, questions, train=False, inference='generate')
        video = image.unsqueeze(1)
        assert answer_video_questions(model, video, questions, 'rank', (ids, atts), answers, k_test=3) == \
            [answers[int(i)] for i in ranked]
        assert answer_video_questions(model, video, questions, 'generate') == generated


@pytest.mark.parametrize('inference', ['rank', 'generate'])
def test_eval_videoqa_answers_every_question_and_logs_the_accuracy(toy, tmp_path, inference):
    ckpt = tmp_path / 'toy_vqa.pth'
    torch.manual_seed(0)
    torch.save({'model': blip_vqa(med_config='configs/toy/med_config.json', vit='tiny', image_size=64).state_dict()},
               ckpt)
    stats = eval_videoqa.main(['--config', str(ROOT / 'configs/toy/videoqa.yaml'), '--output_dir', str(tmp_path),
                               '--device', 'cpu', '--options', *toy_options(toy), f'pretrained={ckpt}',
                               f'inference={inference}', 'batch_size=4', 'frame_chunk=5'])
    qa = json.loads((toy / 'annotation' / 'videoqa_test.json').read_text())
    results = json.loads((tmp_path / 'result' / 'videoqa_test.json').read_text())
    assert sorted(r['question_id'] for r in results) == [e['id'] for e in qa] == list(range(18))
    if inference == 'rank':
        candidates = json.loads((toy / 'annotation/videoqa_answer_list.json').read_text())
        assert {r['answer'] for r in results} <= set(candidates)
    logged = json.loads((tmp_path / 'log.txt').read_text().splitlines()[-1])
    assert logged == stats and stats['inference'] == inference and stats['num_questions'] == 18
    assert stats['test_acc'] == pytest.approx(vqa_accuracy(results, [{'question_id': e['id'], 'answer': e['answer']}
                                                                     for e in qa]))


def test_bad_qa_files_name_the_file_and_entry(tmp_path):
    qa = tmp_path / 'qa.json'
    qa.write_text(json.dumps([{'video_id': 1, 'question': 'what?', 'answer': 'x'}, {'video_id': 2, 'question': 'q'}]))
    with pytest.raises(AnnotationError, match=r"qa.json: entry 1 has no key 'answer'"):
        videoqa_dataset(str(qa), str(tmp_path))
    with pytest.raises(FileNotFoundError, match='answer_list .*missing.json does not exist'):
        videoqa_dataset(str(qa), str(tmp_path), answer_list=str(tmp_path / 'missing.json'))


def test_msvd_ids_are_mapped_to_their_youtube_names(tmp_path):
    qa = tmp_path / 'test_qa.json'
    qa.write_text(json.dumps([{'video_id': 1, 'question': 'What is he doing?', 'answer': 'cook', 'id': 7}]))
    (tmp_path / 'youtube_mapping.txt').write_text('-4wsuPCjDBc_5_15 vid1\n')
    ds = videoqa_dataset(str(qa), '/videos', video_fmt='.avi', video_mapping=str(tmp_path / 'youtube_mapping.txt'))
    assert ds.video_path(0) == '/videos/-4wsuPCjDBc_5_15.avi' and ds.annotation[0]['question_id'] == 7
    plain = videoqa_dataset(str(qa), '/videos')
    assert plain.video_path(0) == '/videos/video1.mp4'


def video_blind_accuracy(qa: list) -> float:
    """Exact-match accuracy of answering each question string with its most frequent answer in the set itself:
    the best any answerer that does not look at the video can do (an optimistic bound)."""
    by_question = defaultdict(Counter)
    for e in qa:
        by_question[e['question']][e['answer']] += 1
    return 100 * sum(by_question[e['question']].most_common(1)[0][0] == e['answer'] for e in qa) / len(qa)


@pytest.mark.learning
def test_a_toy_vqa_model_answers_video_questions_better_than_without_the_video(module_dir):
    data = ensure_toy_dataset(module_dir('toy_learning'), n_train=500, n_val=2, n_test=2, n_web=2, n_videos=2,
                              video_frames=2, n_videoqa=64)
    vqa_dir = module_dir('toy_vqa')
    # ~20 s on an idle 2-core host, ~70% of it these 138 training steps, the fewest measured to learn colours:
    # 2 epochs (92 steps, lr 2e-3 or 3e-3), 350 images (99 steps), batch 96 (45 steps, lr 2e-3 or 6e-3), batch 16
    # on 250 images, or 32-px images all stayed at or below the video-blind answer (measured for issue 26)
    run('train_vqa', 'vqa', data, vqa_dir, f'vqa_root={data}/images', 'max_epoch=3', 'batch_size_test=256')
    out = module_dir('toy_videoqa')
    # 8 frames, not the paper's 16: the same answers here (59.9 both), a third of the evaluation's time
    argv = ['--config', str(ROOT / 'configs/toy/videoqa.yaml'), '--output_dir', str(out), '--device', 'cpu',
            '--options', *toy_options(data), f'pretrained={vqa_dir}/checkpoint_02.pth', 'num_frm_test=8']
    stats = eval_videoqa.main(argv)
    blind = video_blind_accuracy(json.loads((data / 'annotation' / 'videoqa_test.json').read_text()))
    print(stats, blind)
    assert stats['test_acc'] > blind + 8, (stats, blind)
