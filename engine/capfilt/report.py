"""CapFilt's HTML report: a page like the paper's Figure 4, sampled images with captions marked kept or removed."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from data.loading import join_root
from engine.capfilt.config import CapFiltConfig
from engine.capfilt.folder import write_atomic
from engine.capfilt.scoring import image_path
from engine.capfilt.selection import kept_captions

def thumbnail_data_uri(path: str, size: int = 160) -> str:
    """The image as an embedded JPEG thumbnail; '' when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            im.thumbnail((size, size))
            if max(im.size) < size // 2:  # toy images are tiny: enlarge for viewing
                scale = size // max(im.size)
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, format='JPEG', quality=85)
        return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')
    except Exception:
        return ''


def caption_line(kind: str, caption: str, score: float, kept: bool) -> str:
    status = 'kept' if kept else 'removed'
    return (f'<li class="{status}"><span class="tag">{kind}, {status}, {score:.3f}</span> '
            f'{html.escape(caption)}</li>')


def write_html_report(path: Path, samples: list[tuple[dict, dict]], config: CapFiltConfig) -> None:
    """A page like the paper's Figure 4: each image with its web caption and synthetic captions."""
    rows = []
    for entry, r in samples:
        src = entry.get('thumbnail') or thumbnail_data_uri(join_root(config.image_root,
                                                                      image_path(entry).removeprefix('file://')))
        img = (f'<img src="{src}" alt="{html.escape(image_path(entry))}">' if src
               else f'<span class="missing">{html.escape(image_path(entry))} (unreadable)</span>')
        # marked as the output has them: score, keep mode and duplicates (kept_captions keeps this order)
        kept, j, lines = kept_captions(entry, r, config), 0, []
        for kind, caption, score in [('web', entry['caption'], r['w'])] + [('synthetic', c, s) for c, s in r['s']]:
            in_output = j < len(kept) and kept[j] == (caption, kind)
            j += in_output
            lines.append(caption_line(kind, caption, score, in_output))
        rows.append(f'<tr><td>{img}</td><td><ul>{"".join(lines)}</ul></td></tr>')
    score_name = 'ITM match probability' if config.score == 'itm' else 'ITC cosine similarity'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>CapFilt report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
td {{ vertical-align: top; padding: 6px; border-bottom: 1px solid #ddd; }}
ul {{ list-style: none; padding-left: 0; margin: 0; }}
.kept {{ color: #1a7f37; }}
.removed {{ color: #b42318; text-decoration: line-through; }}
.tag {{ font-size: 80%; color: #555; text-decoration: none; display: inline-block; min-width: 14em; }}
</style>
</head>
<body>
<h1>CapFilt: captioner and filter</h1>
<p>Score: {html.escape(score_name)}; threshold {config.threshold}; keep: {html.escape(config.keep)};
{len(samples)} sampled images. Green captions are kept, red (struck through) ones removed.</p>
<table>
{chr(10).join(rows)}
</table>
</body>
</html>
"""
    write_atomic(path, lambda f: f.write(page))


def thumbnail(image) -> str:
    im = image.copy()
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.convert('RGB').save(buf, format='JPEG', quality=85)
    return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')
