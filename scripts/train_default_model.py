#!/usr/bin/env python
"""Reproduce the embedded default model in ``tl_degeneracy/default_model/``.

Everything is rebuilt from the text source, offline, with a fixed seed:

1. **Text.** Jane Austen's six completed novels (1811-1818; public domain) as packaged
   for R by Julia Silge (CRAN ``janeaustenr`` 1.0.0, MIT; transcriptions from Project
   Gutenberg), taken from the Debian package ``r-cran-janeaustenr`` 1.0.0-1 (fetched with
   ``apt-get download``, checked against its SHA-256, unpacked with ``dpkg-deb``). The
   novels are stored there as R lazy-load data (``data/Rdata.rdb``/``.rdx``), which the
   small R-serialization reader below decodes; R itself is not needed. Lines are
   re-flowed into paragraphs; a document is one chapter (paragraphs joined by a blank
   line). *Persuasion* is held out entirely: it is the validation split and the shipped
   default text (``default_text.jsonl.gz``); the other five novels are the training split.
2. **Tokenizer.** Byte-level BPE (GPT-2 style, ``tokenizers``) with 2048 entries trained
   on the training split; ``<|endoftext|>`` (id 0) is BOS, EOS and pad.
3. **Model.** A GPT-2-architecture transformer (pre-LayerNorm, ``gelu_new``, learned
   positional embeddings, tied input/output embeddings during training) written below in
   plain PyTorch with HookedTransformer parameter names and shapes, so that its state dict
   loads unchanged through ``tl_degeneracy.generations.model_from_tl_state_dict`` into a
   ``HookedTransformer`` (TL 3.x) or a ``TransformerBridge`` (TL 4.x). Training rows are
   what TransformerLens's ``tokenize_and_concatenate`` makes: documents joined by EOS, and
   a window of ``n_ctx - 1`` tokens after a BOS (training windows start at random offsets).
4. **Export.** ``model.safetensors`` (float32, HookedTransformer format), ``config.json``
   (the TL config plus training facts and losses), the tokenizer files and the text.

Losses are mean next-token cross-entropy in nats per token over the rows
``tokenize_and_concatenate`` would produce (all positions after the BOS).

Usage (from the repo root)::

    python scripts/train_default_model.py                # fetch the .deb, train, export
    python scripts/train_default_model.py --deb PATH.deb  # use an already downloaded .deb
    python scripts/train_default_model.py --steps 200 --out /tmp/dm   # a quick smoke run
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tl_degeneracy" / "default_model"

DEB_NAME = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
DATA_DIR_IN_DEB = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = {  # R object name -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
VALIDATION_NOVELS = ("persuasion",)
SPECIAL = "<|endoftext|>"

MODEL_CFG = dict(
    n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=256,
    act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
    model_name="tl-degeneracy-austen-4l128",
)


# --- 1. text -------------------------------------------------------------------------------

class _RReader:
    """Just enough of R's XDR serialization format (version 2/3) for character vectors,
    lists, pairlists and attributes: what a package's lazy-load data holds."""

    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def header(self) -> _RReader:
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            n = self._int()
            self.i += n  # skip the native encoding name
        return self

    def item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 251):  # NULL, empty env, global env, missing arg
            return None
        if kind == 255:  # reference to an earlier symbol
            ref = flags >> 8 or self._int()
            return self.refs[ref - 1]
        if kind == 1:  # symbol
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if kind == 2:  # pairlist: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag[1] if tag else None, car)] + (cdr if isinstance(cdr, list) else [])
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.b[self.i:self.i + n]
            self.i += n
            return raw.decode("utf-8" if (flags >> 12) & 8 else "latin-1")
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = self._int()
            if n == -1:
                n = (self._int() << 32) + self._int()
            if kind in (10, 13):
                values = list(struct.unpack_from(f">{n}i", self.b, self.i))
                self.i += 4 * n
            elif kind == 14:
                values = list(struct.unpack_from(f">{n}d", self.b, self.i))
                self.i += 8 * n
            else:
                values = [self.item() for _ in range(n)]
            attrs = dict(self.item()) if has_attr else {}
            return ("vec", values, attrs)
        raise ValueError(f"R object type {kind} is not supported by this reader")


def read_r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """``{name: character vector}`` from an R package's ``data/Rdata.rdb``/``.rdx``."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).header().item()
    variables = index[1][0]
    names = variables[2]["names"][1]
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (_, (offset, length), _) in zip(names, variables[1]):
        chunk = rdb[offset:offset + length]
        out[name] = _RReader(zlib.decompress(chunk[4:])).header().item()[1]
    return out


def fetch_deb(workdir: Path, deb: Path | None) -> Path:
    if deb is None:
        subprocess.run(["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"], cwd=workdir, check=True)
        deb = next(workdir.glob(f"{DEB_NAME}_*.deb"))
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb}: sha256 {digest} is not the expected {DEB_SHA256}")
    target = workdir / "deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target / DATA_DIR_IN_DEB


_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b")


def novel_chapters(lines: list[str]) -> list[str]:
    """Re-flow a novel's lines into paragraphs; one document per chapter."""
    paragraphs, current = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    chapters: list[list[str]] = [[]]
    for para in paragraphs:
        if _CHAPTER.match(para) and chapters[-1]:
            chapters.append([])
        chapters[-1].append(re.sub(r"\s+", " ", para))
    return ["\n\n".join(ch) for ch in chapters if ch]


def load_corpus(data_dir: Path) -> dict[str, list[str]]:
    raw = read_r_lazyload(data_dir)
    missing = set(NOVELS) - set(raw)
    if missing:
        raise SystemExit(f"novels missing from the R data: {sorted(missing)}")
    return {name: novel_chapters(raw[name]) for name in NOVELS}


# --- 2. tokenizer ----------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(SPECIAL) != 0:
        raise SystemExit(f"tokenizer came out with {tok.get_vocab_size()} entries / "
                         f"special id {tok.token_to_id(SPECIAL)}")
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL,
        model_max_length=MODEL_CFG["n_ctx"], clean_up_tokenization_spaces=False,
    )


def portable_tokenizer_config(folder: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast`` (transformers 4.x and 5.x both load that)."""
    path = folder / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    conf.pop("backend", None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """Documents joined by EOS, as ``tokenize_and_concatenate`` does."""
    eos = tok.token_to_id(SPECIAL)
    ids: list[int] = []
    for i, enc in enumerate(tok.encode_batch(docs, add_special_tokens=False)):
        if i:
            ids.append(eos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def rows_like_tokenize_and_concatenate(stream: torch.Tensor, n_ctx: int, bos: int) -> torch.Tensor:
    seq = n_ctx - 1
    n = stream.numel() // seq
    body = stream[: n * seq].view(n, seq)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


# --- 3. model ----------------------------------------------------------------------------------

class GPT(nn.Module):
    """GPT-2 architecture with HookedTransformer parameter names and shapes."""

    def __init__(self, cfg: dict, dropout: float = 0.0):
        super().__init__()
        d, H, dh, dm, V, L = (cfg[k] for k in ("d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_layers"))
        self.cfg, self.dropout = cfg, dropout
        P = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731
        self.W_E, self.W_pos = P(V, d), P(cfg["n_ctx"], d)
        self.blocks = nn.ModuleList()
        for _ in range(L):
            blk = nn.Module()
            blk.ln1_w, blk.ln1_b, blk.ln2_w, blk.ln2_b = P(d), P(d), P(d), P(d)
            blk.W_Q, blk.W_K, blk.W_V = P(H, d, dh), P(H, d, dh), P(H, d, dh)
            blk.b_Q, blk.b_K, blk.b_V = P(H, dh), P(H, dh), P(H, dh)
            blk.W_O, blk.b_O = P(H, dh, d), P(d)
            blk.W_in, blk.b_in, blk.W_out, blk.b_out = P(d, dm), P(dm), P(dm, d), P(d)
            self.blocks.append(blk)
        self.lnf_w, self.lnf_b = P(d), P(d)
        self.b_U = P(V)  # W_U is tied to W_E.T while training; exported untied

    def init_weights(self, generator: torch.Generator) -> None:
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg["n_layers"])
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.endswith("_w"):
                    p.fill_(1.0)
                elif leaf.startswith("W_"):
                    p.normal_(0.0, out_std if leaf in ("W_O", "W_out") else std, generator=generator)
                else:
                    p.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        H = self.cfg["n_heads"]
        drop = lambda x: F.dropout(x, self.dropout, self.training)  # noqa: E731
        x = drop(self.W_E[tokens] + self.W_pos[:T])
        for b in self.blocks:
            h = F.layer_norm(x, (x.shape[-1],), b.ln1_w, b.ln1_b, eps=1e-5)
            # one [d, 3*H*dh] matmul for Q, K and V (the [H, d, dh] weights laid side by side)
            w_qkv = torch.cat([b.W_Q, b.W_K, b.W_V]).permute(1, 0, 2).reshape(h.shape[-1], -1)
            qkv = (h @ w_qkv + torch.cat([b.b_Q, b.b_K, b.b_V]).reshape(-1)).view(B, T, 3 * H, -1).transpose(1, 2)
            q, k, v = qkv.split(H, dim=1)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            z = z.transpose(1, 2).reshape(B, T, -1)
            x = x + drop(z @ b.W_O.reshape(-1, b.W_O.shape[-1]) + b.b_O)
            h = F.layer_norm(x, (x.shape[-1],), b.ln2_w, b.ln2_b, eps=1e-5)
            h = F.gelu(h @ b.W_in + b.b_in, approximate="tanh")
            x = x + drop(h @ b.W_out + b.b_out)
        x = F.layer_norm(x, (x.shape[-1],), self.lnf_w, self.lnf_b, eps=1e-5)
        return x @ self.W_E.T + self.b_U

    def tl_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"embed.W_E": self.W_E, "pos_embed.W_pos": self.W_pos}
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}"
            sd |= {f"{p}.ln1.w": b.ln1_w, f"{p}.ln1.b": b.ln1_b, f"{p}.ln2.w": b.ln2_w, f"{p}.ln2.b": b.ln2_b}
            for m in "QKV":
                sd[f"{p}.attn.W_{m}"] = getattr(b, f"W_{m}")
                sd[f"{p}.attn.b_{m}"] = getattr(b, f"b_{m}")
            sd |= {f"{p}.attn.W_O": b.W_O, f"{p}.attn.b_O": b.b_O}
            sd |= {f"{p}.mlp.W_in": b.W_in, f"{p}.mlp.b_in": b.b_in,
                   f"{p}.mlp.W_out": b.W_out, f"{p}.mlp.b_out": b.b_out}
        sd |= {"ln_final.w": self.lnf_w, "ln_final.b": self.lnf_b, "unembed.W_U": self.W_E.T, "unembed.b_U": self.b_U}
        return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


@torch.no_grad()
def mean_loss(model: GPT, rows: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start:start + batch_size]
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def train(model: GPT, stream: torch.Tensor, args, bos: int, log) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    decay = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("W_")]
    no_decay = [p for n, p in model.named_parameters() if not n.rsplit(".", 1)[-1].startswith("W_")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    n_ctx, seq = MODEL_CFG["n_ctx"], MODEL_CFG["n_ctx"] - 1
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0, running = time.time(), None
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - seq, (args.batch_size,), generator=gen)
        body = torch.stack([stream[s:s + seq] for s in starts.tolist()])
        batch = torch.cat([torch.full((args.batch_size, 1), bos, dtype=torch.long), body], dim=1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        model.train()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = float(loss.detach()) if running is None else 0.98 * running + 0.02 * float(loss.detach())
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d}/{args.steps}  loss {running:.4f}  lr {lr_at(step):.2e}  {time.time() - t0:7.1f}s")
    return {"steps": args.steps, "batch_size": args.batch_size, "train_seconds": round(time.time() - t0, 1),
            "tokens_seen": args.steps * args.batch_size * (n_ctx - 1)}


# --- 4. export -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help=f"an already downloaded {DEB_NAME}_{DEB_VERSION}_all.deb")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--train-eval-rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        corpus = load_corpus(fetch_deb(Path(tmp), args.deb.resolve() if args.deb else None))
    train_docs = [doc for name, docs in corpus.items() if name not in VALIDATION_NOVELS for doc in docs]
    val_docs = [doc for name in VALIDATION_NOVELS for doc in corpus[name]]
    log(f"text: {len(train_docs)} train chapters ({sum(map(len, train_docs)):,} chars), "
        f"{len(val_docs)} validation chapters ({sum(map(len, val_docs)):,} chars)")

    tok = train_tokenizer(train_docs, MODEL_CFG["d_vocab"])
    bos = tok.token_to_id(SPECIAL)
    train_stream, val_stream = token_stream(tok, train_docs), token_stream(tok, val_docs)
    log(f"tokens: train {train_stream.numel():,}, validation {val_stream.numel():,} "
        f"({sum(map(len, train_docs)) / train_stream.numel():.2f} chars/token on train)")

    model = GPT(MODEL_CFG, dropout=args.dropout)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    n_exported = sum(v.numel() for v in model.tl_state_dict().values())
    log(f"model: {json.dumps(MODEL_CFG)}; {n_exported:,} parameters as exported")
    facts = train(model, train_stream, args, bos, log)
    model.dropout = 0.0

    train_rows = rows_like_tokenize_and_concatenate(train_stream, MODEL_CFG["n_ctx"], bos)
    val_rows = rows_like_tokenize_and_concatenate(val_stream, MODEL_CFG["n_ctx"], bos)
    # train loss on an evenly spaced subset of the training rows (all of them would take minutes)
    train_rows = train_rows[torch.linspace(0, train_rows.shape[0] - 1, args.train_eval_rows).long()]
    train_loss, val_loss = mean_loss(model, train_rows), mean_loss(model, val_rows)
    log(f"final loss (nats/token): train {train_loss:.4f}, validation {val_loss:.4f}; "
        f"uniform would be {math.log(MODEL_CFG['d_vocab']):.4f}")

    from safetensors.torch import save_file

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.tl_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(tok).save_pretrained(str(out))
    portable_tokenizer_config(out)
    with gzip.GzipFile(out / "default_text.jsonl.gz", "wb", mtime=0) as fh:
        for doc in val_docs:
            fh.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))
    config = {
        "tl_config": MODEL_CFG,
        "parameters": n_exported,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": MODEL_CFG["d_vocab"],
                      "bos_eos_pad": SPECIAL, "bos_id": bos},
        "data": {
            "text": "Jane Austen's six completed novels: " + ", ".join(NOVELS.values()),
            "license": "the novels are in the public domain (published 1811-1818); packaging: R package "
                       "janeaustenr 1.0.0 by Julia Silge, MIT license; transcriptions from Project Gutenberg",
            "source": f"Debian package {DEB_NAME} {DEB_VERSION} (sha256 {DEB_SHA256}), {DATA_DIR_IN_DEB}/Rdata.rdb",
            "document": "one chapter; lines re-flowed into paragraphs joined by a blank line",
            "train_novels": [NOVELS[n] for n in NOVELS if n not in VALIDATION_NOVELS],
            "validation_novels": [NOVELS[n] for n in VALIDATION_NOVELS],
            "train_tokens": int(train_stream.numel()),
            "validation_tokens": int(val_stream.numel()),
            "default_text": "default_text.jsonl.gz: the validation novel, one JSON object {\"text\": chapter} per line",
        },
        "training": {
            **facts, "seed": args.seed, "optimizer": "AdamW(betas=(0.9, 0.95))", "lr": args.lr,
            "lr_schedule": "linear warmup, cosine to 10%", "weight_decay": args.weight_decay,
            "dropout": args.dropout, "grad_clip": 1.0, "tied_embeddings_during_training": True,
            "context": f"BOS + {MODEL_CFG['n_ctx'] - 1} tokens from the EOS-joined stream, random offsets",
            "threads": args.threads, "torch": torch.__version__,
        },
        "loss_nats_per_token": {
            "train": round(train_loss, 4), "validation": round(val_loss, 4),
            "uniform": round(math.log(MODEL_CFG["d_vocab"]), 4),
            "train_rows_evaluated": args.train_eval_rows,
            "validation_rows_evaluated": int(val_rows.shape[0]),
            "measured_on": ("rows of BOS + n_ctx-1 tokens, as tokenize_and_concatenate makes them; "
                            "all predicted positions"),
        },
        "reproduce": "python scripts/train_default_model.py",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(out.iterdir()):
        if f.is_file():
            log(f"  {f.name:28s} {f.stat().st_size:>10,} bytes")


if __name__ == "__main__":
    sys.exit(main())
