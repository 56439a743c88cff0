"""pre_caption / pre_question reproduce the original's cleaning (reference 7.2) on tricky strings."""
import pytest

from data.utils import pre_caption, pre_question


@pytest.mark.parametrize('raw, expected', [
    ('A  Dog!!  "jumps"  (over) the fence.\n', 'a dog jumps over the fence'),
    ("It's a man's hat, isn't it? yes-no/maybe", "it's a man's hat, isn't it? yes-no/maybe"),
    ('a;b:c~d*e#f', 'a b c d e f'),
    ('  #Tag at start', 'tag at start'),
    ('one\ntwo', 'one\ntwo'),           # a single whitespace char is not a run: kept
    ('one \n\t two', 'one two'),        # runs of two or more become one space
    ('hello\n', 'hello'),
    ('...', ''),
])
def test_pre_caption(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_words():
    assert pre_caption('One two. Three four five', max_words=3) == 'one two three'
    assert pre_caption(' '.join(['w'] * 40), 30) == ' '.join(['w'] * 30)


@pytest.mark.parametrize('raw, expected', [
    ('What  color is the "dog"?', 'what  color is the dog?'),   # no collapsing, '?' kept
    ('Is it   red?!. ', 'is it   red?'),
    ('(How) many; people: here~*#', 'how many people here'),
    ('  Leading spaces stay', '  leading spaces stay'),
])
def test_pre_question(raw, expected):
    assert pre_question(raw) == expected


def test_pre_question_truncation_counts_empty_words():
    # split(' ') on a double space yields an empty word, as in the original.
    assert pre_question('a  b c', max_ques_words=2) == 'a '
    assert pre_question('a b c d', max_ques_words=2) == 'a b'
