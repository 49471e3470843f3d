"""Cross-implementation fixtures: tiny random CLIP checkpoints of both families, images,
captions, and the embeddings their owners' own code computes from them.

clipcid's test `crates/clipcid-pipeline/tests/reference.rs` embeds the same image files and
strings end to end (`clipcid_pipeline::embed`: checkpoint discovery, config reading, each
family's preprocessing, tokenizer, towers) and must agree to 1e-4.

    python -m venv ~/ref-venv && ~/ref-venv/bin/pip install torch torchvision \
        transformers open_clip_torch safetensors pillow ftfy
    ~/ref-venv/bin/python scripts/reference/cross_reference.py write crates/clipcid-pipeline/tests/fixtures/reference
    ~/ref-venv/bin/python scripts/reference/cross_reference.py student DIR IMAGES CAPTIONS

`write` makes, under the output folder (about 0.8 MB):

- `hf/`: a transformers CLIPModel (GELU, widths 32) with a config.json in the shape of the
  Hub's openai/clip-vit-base-patch32 file (`text_config_dict: null`, legacy `eos_token_id: 2`),
  model.safetensors, tokenizer files and preprocessor_config.json as `save_pretrained` writes.
- `hf-sharded/`: the same weights as `model.safetensors.index.json` + shards.
- `open_clip/`: an open_clip CLIP whose open_clip_config.json omits what open_clip defaults
  (text heads, MLP ratio, quick_gelu, preprocessing), open_clip_model.safetensors, and a
  truncated `bpe_simple_vocab_16e6.txt.gz` (the first MERGES merges of OpenAI's).
- `open_clip-bin/`: the same weights as a PyTorch pickle, `open_clip_pytorch_model.bin`.
- `images/`: PNGs whose sizes exercise resizing (down, up) and odd crop margins (where
  transformers' floor and torchvision's round differ), an RGBA and a grayscale one, with
  `captions.tsv` (plain captions, which both families' tokenizers clean alike) and
  `captions-open_clip.tsv` (HTML entities, ligatures, curly quotes: open_clip cleans them).
- `reference.json`: L2-normalised image and text embeddings per family (transformers: its
  PIL image processor `CLIPImageProcessorPil` and `CLIPTokenizerFast`; open_clip: the
  transform `create_model_and_transforms('local-dir:...')` returns and its `SimpleTokenizer`),
  plus open_clip's token ids for TOKENIZER_STRINGS at context 77.

Weights are random, rounded to float16 and stored as float16 (half the bytes); both the
reference and clipcid compute in float32 from those same values.

`resize DIR` writes Pillow's resize of small random RGB and RGBA images with all six filters
(`crates/clipcid-data/tests/fixtures/pillow-resize/`, for `pil_resize` / `pil_resize_rgba`).

`student DIR IMAGES CAPTIONS` loads a clipcid-written model folder with transformers
(`CLIPModel` + `CLIPProcessor.from_pretrained`) and, when DIR holds an open_clip_config.json,
with `open_clip.create_model_and_transforms('local-dir:DIR')`, and prints their normalised
embeddings of IMAGES (a folder of PNGs, sorted by name) and CAPTIONS (one per line) as JSON.
"""
import gzip
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

SEED = 0
MERGES = 200
WIDTH = 32
IMAGE = 32
PATCH = 8
CONTEXT = 16
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red car",
            "the digit seven", "an empty street at night", "a bowl of soup",
            "a black and white photo", "stripes"]
OPEN_CLIP_CAPTIONS = ["Fish &amp; Chips", "\ufb01sh and \ufb02owers", "\u201cquoted\u201d text",
                      "caf\u00e9 au lait", "lots   of \u00a0 space", "&lt;b&gt;bold&lt;/b&gt;",
                      "\uff21\uff22\uff23 fullwidth", "it\u2019s fine"]
TOKENIZER_STRINGS = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "Fish &amp; Chips", "Fish &amp;amp; Chips",
    "&lt;b&gt;bold&lt;/b&gt;", "&quot;quoted&quot; &#39;single&#39;", "&eacute;t&eacute;",
    "&#x1F600; smile", "AT&T", "&nbsp;non&nbsp;breaking", "\ufb01sh \ufb02ower \ufb00 \ufb03",
    "\u201ccurly\u201d \u2018quotes\u2019", "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "cafe\u0301 (combining accent)", "\u00c5ngstr\u00f6m \u00df \u0130stanbul", "emoji \U0001F600\U0001F431\U0001F1EB\U0001F1F7",
    "\u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4", "\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28\u3000text", "tabs\tand\nnewlines\r\nhere",
    "   leading and trailing   ", "numbers 12345 and 3.14", "don't won't it's we're I'm you'll he'd",
    "hyphen-ated and under_scored", "punctuation!!! ??? ...", "\u2028line\u2029separators\u0085",
    "control\u0007chars\u001b[31m red\u001b[0m", "x" * 300,
    " ".join(["word"] * 100), "a " * 40 + "end", "\u00a0\u2003odd\u2009spaces\u3000",
    "mixed CASE WithCaps", "#hashtag @mention http://example.com/a?b=c",
]


def round_f16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())


def f16_state(model):
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}


def bpe_merges():
    import open_clip
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return lines[0], lines[1:1 + MERGES]


def write_images(out):
    """PNG sizes: no resize, odd crop margins (floor != round), downscale, upscale, RGBA, L."""
    rng = np.random.default_rng(SEED)
    sizes = [(32, 32), (35, 32), (32, 47), (50, 37), (64, 48), (20, 30), (45, 33), (33, 40)]
    os.makedirs(out, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([np.sin(x / (3 + i) + c) * 90 + np.cos(y / (4 + c)) * 30 + 128
                           for c in range(3)], -1)
        noise = rng.normal(0, 25, (h, w, 3))
        a = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        if i == 6:
            img = Image.fromarray(np.dstack([a, rng.integers(0, 256, (h, w), dtype=np.uint8)]), "RGBA")
        elif i == 7:
            img = Image.fromarray(a[..., 0], "L")
        else:
            img = Image.fromarray(a, "RGB")
        name = f"{i}.png"
        img.save(os.path.join(out, name), optimize=True)
        names.append(name)
    return names


def normalize(t):
    return torch.nn.functional.normalize(t.float(), dim=-1)


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def hf_reference(dir_, image_dir, names, captions, tok_dir=None):
    from transformers import CLIPModel, CLIPTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    model = CLIPModel.from_pretrained(dir_, dtype=torch.float32).eval()
    proc = CLIPImageProcessorPil.from_pretrained(dir_)
    tok = CLIPTokenizerFast.from_pretrained(tok_dir or dir_)
    images = [Image.open(os.path.join(image_dir, n)) for n in names]
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    ids = tok(captions, padding="max_length", max_length=CONTEXT, truncation=True,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = normalize(features(model.get_image_features(pixel_values=px)))
        txt = normalize(features(model.get_text_features(input_ids=ids)))
    return img, txt


def open_clip_reference(dir_, image_dir, names, captions, bpe_path):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dir_}")
    model.eval()
    tok = SimpleTokenizer(bpe_path=bpe_path, context_length=CONTEXT)
    px = torch.stack([preprocess(Image.open(os.path.join(image_dir, n))) for n in names])
    with torch.no_grad():
        img = normalize(model.encode_image(px))
        txt = normalize(model.encode_text(tok(captions)))
    return img, txt


def rows(t):
    return [[float(v) for v in r] for r in t]


def write(out):
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    header, merges = bpe_merges()
    vocab_size = 512 + MERGES + 2
    image_dir = os.path.join(out, "images")
    names = write_images(image_dir)
    with open(os.path.join(image_dir, "captions.tsv"), "w") as f:
        for n, c in zip(names, CAPTIONS):
            f.write(f"{n}\t{c}\n")
    with open(os.path.join(image_dir, "captions-open_clip.tsv"), "w") as f:
        for n, c in zip(names, OPEN_CLIP_CAPTIONS):
            f.write(f"{n}\t{c}\n")

    # open_clip's tokenizer file: the header line and the first MERGES merges.
    tmp = os.path.join(out, "tmp")
    os.makedirs(tmp)
    bpe_path = os.path.join(tmp, "bpe_simple_vocab_16e6.txt.gz")
    with gzip.GzipFile(bpe_path, "wb", mtime=0) as f:
        f.write("\n".join([header] + merges).encode("utf-8"))  # no final newline: open_clip would read an empty merge

    # ---------------- transformers ----------------
    torch.manual_seed(SEED)
    hub_b32 = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..",
                                          "crates/clipcid-models/tests/fixtures/hub-configs/openai-clip-vit-base-patch32.json")))
    cfg = json.loads(json.dumps(hub_b32))
    cfg["projection_dim"] = WIDTH
    cfg["text_config"].update(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=2,
                              num_hidden_layers=2, max_position_embeddings=CONTEXT,
                              vocab_size=vocab_size, hidden_act="gelu",
                              bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1)
    cfg["vision_config"].update(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=2,
                                num_hidden_layers=2, image_size=IMAGE, patch_size=PATCH,
                                hidden_act="gelu")
    cfg["_name_or_path"] = "clipcid/reference-tiny"
    cfg_path = os.path.join(tmp, "config.json")
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    model = CLIPModel(CLIPConfig.from_json_file(cfg_path)).eval()
    round_f16(model)
    hf = os.path.join(out, "hf")
    model.save_pretrained(hf)
    # The weights as float16, the config as the Hub writes it.
    from safetensors.torch import save_file
    save_file(f16_state(model), os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(cfg_path, os.path.join(hf, "config.json"))
    # Tokenizer from the truncated merges, in transformers' files.
    tok = CLIPTokenizerFast(vocab=_clip_vocab(merges), merges=[tuple(m.split()) for m in merges],
                            model_max_length=CONTEXT)
    assert len(tok) == vocab_size, len(tok)
    tok.save_pretrained(hf)
    for extra in ("vocab.json", "merges.txt"):
        if os.path.exists(os.path.join(hf, extra)):
            os.remove(os.path.join(hf, extra))
    # openai/clip-vit-base-patch32's preprocessor_config.json at this size.
    json.dump({"crop_size": IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
               "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": OPENAI_MEAN,
               "image_std": OPENAI_STD, "resample": 3, "size": IMAGE},
              open(os.path.join(hf, "preprocessor_config.json"), "w"), indent=2)
    hf_img, hf_txt = hf_reference(hf, image_dir, names, CAPTIONS)

    sharded = os.path.join(out, "hf-sharded")
    model.half().save_pretrained(sharded, max_shard_size="150KB")
    model.float()
    shutil.copy(cfg_path, os.path.join(sharded, "config.json"))
    shutil.copy(os.path.join(hf, "preprocessor_config.json"), sharded)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json")), os.listdir(sharded)
    sh_img, sh_txt = hf_reference(sharded, image_dir, names, CAPTIONS, tok_dir=hf)
    assert float((sh_img - hf_img).abs().max()) == 0.0 and float((sh_txt - hf_txt).abs().max()) == 0.0

    # The default (torchvision) image processor, for the record: not Pillow-exact.
    fast = CLIPImageProcessor.from_pretrained(hf)
    px_fast = fast(images=[Image.open(os.path.join(image_dir, n)) for n in names],
                   return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        fast_img = normalize(features(model.get_image_features(pixel_values=px_fast)))
    fast_diff = float((fast_img - hf_img).abs().max())

    # ---------------- open_clip ----------------
    oc_cfg = {
        "model_cfg": {
            "embed_dim": WIDTH,
            # head_width set (its default 64 exceeds the width); mlp_ratio, quick_gelu omitted.
            "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": WIDTH, "head_width": 16,
                           "patch_size": PATCH},
            # heads omitted: open_clip's default (8) applies.
            "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "width": WIDTH,
                         "layers": 2},
        },
    }
    oc = os.path.join(out, "open_clip")
    os.makedirs(oc)
    json.dump(oc_cfg, open(os.path.join(oc, "open_clip_config.json"), "w"), indent=2)
    torch.manual_seed(SEED + 1)
    oc_model = open_clip.model.CLIP(**oc_cfg["model_cfg"]).eval()
    with torch.no_grad():  # open_clip initialises some tensors to zero or ones; randomise all
        for name, p in oc_model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.05)
    round_f16(oc_model)
    save_file(f16_state(oc_model), os.path.join(oc, "open_clip_model.safetensors"))
    shutil.copy(bpe_path, oc)
    oc_img, oc_txt = open_clip_reference(oc, image_dir, names, OPEN_CLIP_CAPTIONS, bpe_path)

    oc_bin = os.path.join(out, "open_clip-bin")
    os.makedirs(oc_bin)
    shutil.copy(os.path.join(oc, "open_clip_config.json"), oc_bin)
    torch.save(f16_state(oc_model), os.path.join(oc_bin, "open_clip_pytorch_model.bin"))
    shutil.copy(bpe_path, oc_bin)
    bin_img, bin_txt = open_clip_reference(oc_bin, image_dir, names, OPEN_CLIP_CAPTIONS, bpe_path)
    assert float((bin_img - oc_img).abs().max()) == 0.0

    from open_clip.tokenizer import SimpleTokenizer
    st = SimpleTokenizer(bpe_path=bpe_path, context_length=77)
    ids = st(TOKENIZER_STRINGS).tolist()

    shutil.rmtree(tmp)
    ref = {
        "images": names,
        "captions": CAPTIONS,
        "open_clip_captions": OPEN_CLIP_CAPTIONS,
        "hf": {"image": rows(hf_img), "text": rows(hf_txt)},
        "open_clip": {"image": rows(oc_img), "text": rows(oc_txt)},
        "tokenizer": {"context_length": 77, "strings": TOKENIZER_STRINGS, "ids": ids},
        "note": {
            "transformers_torchvision_processor_max_abs_diff_vs_pil": fast_diff,
            "versions": _versions(),
        },
    }
    json.dump(ref, open(os.path.join(out, "reference.json"), "w"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {total / 1e6:.2f} MB; transformers' torchvision processor differs from "
          f"its PIL one by {fast_diff:.2e} (max abs, normalised image embeddings)")


def _clip_vocab(merges):
    from open_clip.tokenizer import bytes_to_unicode
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m.split()))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {v: i for i, v in enumerate(vocab)}


def _versions():
    import open_clip
    import PIL
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__, "pillow": PIL.__version__}


def student(dir_, images, captions_file):
    """A clipcid-written folder, loaded by transformers and (if it has one) open_clip."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor
    names = sorted(n for n in os.listdir(images) if n.endswith(".png"))
    pil = [Image.open(os.path.join(images, n)) for n in names]  # each processor converts
    captions = [l.rstrip("\n") for l in open(captions_file) if l.strip()]
    out = {"images": names}
    model = CLIPModel.from_pretrained(dir_, dtype=torch.float32).eval()
    # What users run: the processor with its default (torchvision) image backend ...
    proc = CLIPProcessor.from_pretrained(dir_)
    inputs = proc(text=captions, images=pil, return_tensors="pt", padding="max_length")
    # ... and the Pillow backend, the exact legacy CLIPImageProcessor clipcid reproduces.
    pil_proc = AutoImageProcessor.from_pretrained(dir_, backend="pil")
    px_pil = pil_proc(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = lambda px: rows(normalize(features(model.get_image_features(pixel_values=px))))
        out["transformers"] = {
            "image": image(px_pil),
            "image_default_backend": image(inputs["pixel_values"]),
            "text": rows(normalize(features(model.get_text_features(input_ids=inputs["input_ids"])))),
            "image_processor": type(pil_proc).__name__,
        }
    if os.path.exists(os.path.join(dir_, "open_clip_config.json")):
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dir_}")
        model.eval()
        bpe = os.path.join(dir_, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.exists(bpe):  # the folder's own merges (a vocabulary other than OpenAI's)
            from open_clip.tokenizer import SimpleTokenizer
            tok = SimpleTokenizer(bpe_path=bpe, context_length=model.context_length)
        else:
            tok = open_clip.get_tokenizer(f"local-dir:{dir_}")
        px = torch.stack([preprocess(p) for p in pil])
        with torch.no_grad():
            out["open_clip"] = {"image": rows(normalize(model.encode_image(px))),
                                "text": rows(normalize(model.encode_text(tok(captions))))}
    json.dump(out, sys.stdout)


def resize_fixtures(out):
    """Pillow's resize of small random RGB and RGBA images with every filter, as PNGs."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(SEED + 7)
    filters = {"nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
               "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING}
    cases = []
    for i in range(14):
        w, h = (int(v) for v in rng.integers(1, 40, 2))
        mode = "RGBA" if i % 4 == 3 else "RGB"
        a = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        if i % 2:  # smooth content too, where rounding differences show
            y, x = np.mgrid[0:h, 0:w]
            a[..., :3] = (np.sin(x[..., None] / 3.0 + y[..., None] / 5.0 + np.arange(3)) * 120
                          + 128).astype(np.uint8)
        src = Image.fromarray(a, mode)
        src.save(os.path.join(out, f"{i}.png"))
        for name, f in filters.items():
            nw, nh = (int(v) for v in rng.integers(1, 48, 2))
            src.resize((nw, nh), f).save(os.path.join(out, f"{i}-{name}.png"))
            cases.append({"input": f"{i}.png", "filter": name, "width": nw, "height": nh,
                          "output": f"{i}-{name}.png"})
    json.dump({"pillow": _versions()["pillow"], "cases": cases}, open(os.path.join(out, "cases.json"), "w"), indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {len(cases)} resize cases to {out}: {total / 1e3:.0f} kB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "resize":
        resize_fixtures(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "student":
        student(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
