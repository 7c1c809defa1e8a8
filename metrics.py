"""Evaluation metrics for fiber, each matching the official scorer of its benchmark.

- VQA v2 accuracy (the answer normalisation of the official VQA evaluation script),
- COCO caption BLEU-1..4 and CIDEr-D (as pycocoevalcap computes them, tokeniser included),
- image-text retrieval recall@k in both directions,
- COCO box AP/AR, referring-expression accuracy and phrase-grounding recall@k (box_metrics.py,
  re-exported here).

The official scorers carry quirks (a regex that only strips 32 periods, a CIDEr "length" that
counts bigrams, brackets surviving caption tokenisation, ...). They are reproduced on purpose so
that numbers stay comparable with published ones; each is marked where it happens. Run-time
dependencies: numpy, torch and the standard library (no Java, no pycocotools).
"""
import math
import re
from collections import Counter

import numpy as np
import torch

# the box metrics live in box_metrics.py; re-exported so that metrics is the one metrics API
from box_metrics import box_iou, coco_box_ap, grounding_recall, rec_accuracy

__all__ = ["normalize_vqa_answer", "vqa_score", "vqa_soft_score", "coco_caption_tokenize",
           "bleu", "cider_d", "retrieval_recall", "box_iou", "coco_box_ap", "grounding_recall",
           "rec_accuracy"]

# ----------------------------------------------------------------------------------------------
# VQA accuracy

# Contracted forms that the VQA script restores when an answer spells them without apostrophes.
# Its table maps every spelling with exactly one apostrophe dropped to the full form (both
# "couldnt've" and "couldn'tve" give "couldn't've"), which is how _VQA_CONTRACTIONS is built.
# Its entries "Im", "Ive", "Id've", "I'dve" are left out: answers are lower-cased before the
# look-up, so upper-case keys can never fire.
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()
_VQA_CONTRACTIONS = {
    form[:i] + form[i + 1:]: form
    for form in _VQA_CONTRACTED for i, ch in enumerate(form) if ch == "'"
}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one backwards
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!"]
_VQA_NUMBER_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a (mistyped) look-ahead that
# always succeeds, so it removes every period not followed by a digit.
_VQA_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text):
    # Each mark is deleted when it touches a space anywhere in the *original* text (or the text
    # holds a digit,digit comma), otherwise it becomes a space: "yes!" -> "yes ", "a, b" -> "a b".
    glue = _VQA_NUMBER_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or glue else " ")
    # The official call passes re.UNICODE (= 32) where re.sub expects `count`: at most 32 periods
    # are removed. Kept for parity; no real answer has that many.
    return _VQA_PERIOD.sub("", out, count=32)


def normalize_vqa_answer(text):
    """Normalise an answer as the official VQA evaluation does.

    Newlines/tabs become spaces; punctuation is removed or turned into spaces (see
    `_vqa_punctuation`); the text is lower-cased; number words zero..ten (and "none") become
    digits; articles a/an/the are dropped; contractions typed without apostrophes are restored
    ("dont" -> "don't"). Example: "Two dogs." -> "2 dogs".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = _vqa_punctuation(text).lower().split()
    words = [_VQA_NUMBERS.get(w, w) for w in words]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_score(prediction, answers):
    """VQA accuracy of one predicted answer against the human answers (usually 10).

    For each answer i, min(#{j != i : answer_j == prediction} / 3, 1); the mean over i. With 10
    answers of which n match: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.

    Both sides go through `normalize_vqa_answer`. The GT-Vision-Lab script normalises the
    prediction fully but the human answers only for punctuation, and only when they are not all
    identical; with VQA v2 annotations (already normalised) the two agree.
    """
    if len(answers) == 0:
        raise ValueError("vqa_score: `answers` is empty; pass the human answers of the question")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    n_match = sum(matches)
    per_answer = [min((n_match - hit) / 3.0, 1.0) for hit in matches]
    return sum(per_answer) / len(per_answer)


def vqa_soft_score(n_matches):
    """Soft VQA training target of FIBER (and ViLT/METER) for an answer given by `n_matches`
    annotators: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0 (the 10-answer accuracy)."""
    if n_matches < 0:
        raise ValueError(f"vqa_soft_score: n_matches must be >= 0, got {n_matches}")
    return (0.0, 0.3, 0.6, 0.9)[n_matches] if n_matches < 4 else 1.0


# ----------------------------------------------------------------------------------------------
# COCO caption tokenisation (Stanford PTBTokenizer -lowerCase, then pycocoevalcap's filter)

# Tokens pycocoevalcap removes after PTB tokenisation. Its list also names -LRB-, -RRB-, -LCB-,
# -RCB-, but PTB's -lowerCase turns them into "-lrb-" etc., which the list misses: brackets
# survive as tokens in the official scores, and here too.
_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
                 "}": "-rcb-"}
_PTB_UNICODE = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'",
                "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ", "\u00a0": " ",
                "\u200b": ""}
# Text-level splits, applied in order: (pattern, replacement).
_PTB_SPLITS = [
    (re.compile(r'"|``|`'), " "),                          # quotes: PTB's `` and '' are dropped
    (re.compile(r"\.{2,}(?=\w)"), lambda m: " . . " if len(m.group()) == 2 else " ... "),
    (re.compile(r"--+"), " -- "),
    (re.compile(r"(?<!\w)[?!]+|[?!]+(?!\w)"), r" \g<0> "),  # "?!" stays one (kept) token
    (re.compile(r"(?<!\d)[,;:]|[,;:](?!\d)"), r" \g<0> "),  # but 1,000 and 7:30 stay whole
    (re.compile(r"[&%$#=~^|]|\*+|(?<=\w)\+|\+(?!\d)"), r" \g<0> "),
    (re.compile(r"(?<![\w-])-(?=[^\W\d])|(?<=\w)-(?![\w-])"), " - "),  # "-dog", "dog-"
    (re.compile(r"(?<!\w)/(?=\w)|(?<=\w)/(?!\w)"), " / "),  # "w/ skis", but "1/2" stays
    (re.compile(r"(\d\.\d+)([^\W\d_]+)"), r"\1 \2"),      # "1.5m" -> "1.5 m"
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_PTB_BRACKETS[m.group()]} "),  # last: keeps "-"
]
# Words that keep their final period (PTB abbreviation lists, the ones checked against
# stanford-corenlp 3.4.1). Any other word ending in "." has the period split off.
_PTB_ABBREVIATIONS = set("""
mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj
sgt cpl pvt mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det m mme mlle
inc co cos corp pty ptys pte ltd plc bancorp dept bhd assn univ intl sys ph tel est ext sq ft
jr sr bros blvd rd esq etc al seq bldg cf vs v jan feb mar apr jun jul aug sep sept oct nov dec
mon tue tues wed thu thurs fri ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich
minn mo mont neb nev okla penn tenn va vt wis wisc wyo""".split())
_PTB_ABBREVIATIONS_BEFORE_NUMBER = {"no", "nos", "prop", "ca", "fig", "figs", "art", "pp", "op"}
_PTB_ACRONYM = re.compile(r"[^\W\d_](\.[^\W\d_])*")      # initials and u.s, e.g, p.m
# A single-letter initial loses its period when one of these words follows it in capitals
# (PTB reads a sentence end there): "vitamin C. The" -> c . the, but "C. Smith" -> c. smith.
_PTB_SENTENCE_STARTERS = """a about according additionally after an as at but earlier he her
here however if in it last many more now once one other our she since so some such that the
their then there these they this we what when while yet you""".split()
_PTB_INITIAL_AT_SENTENCE_END = re.compile(
    r"(?<![\w.])([^\W\d_])\.(?=\s+(?:%s)(?:\s|$))"
    % "|".join(f"{w.capitalize()}|{w.upper()}" for w in _PTB_SENTENCE_STARTERS))
_PTB_SPECIAL_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                      "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"],
                      "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_PTB_CONTRACTION = re.compile(r"(.+?)(n't|'s|'m|'d|'ll|'re|'ve)", re.IGNORECASE)
# Words that start with an apostrophe without it being an opening quote.
_PTB_LEADING_APOSTROPHE = re.compile(r"'(em|n'|cause|tis|twas|s|m|d|ll|re|ve|\d\ds?)", re.I)
_PTB_TRAILING_APOSTROPHE_WORDS = {"ol'", "'n'"}


def _ptb_keeps_period(word, next_word):
    stem = word[:-1].lower()
    if stem in _PTB_ABBREVIATIONS or _PTB_ACRONYM.fullmatch(stem):
        return True
    if stem in _PTB_ABBREVIATIONS_BEFORE_NUMBER:
        return next_word[:1].isdigit()
    return False


def _ptb_word(word, next_word):
    """Split one whitespace-delimited chunk into PTB tokens (quotes, final periods, clitics)."""
    front, back = [], []
    if word.startswith("'") and len(word) > 1 and not _PTB_LEADING_APOSTROPHE.fullmatch(word):
        front, word = ["`"], word[1:]                     # an opening single quote
    while len(word) > 1 and word.strip("."):
        dots = len(word) - len(word.rstrip("."))
        if dots >= 2:                                     # "wait..", "dog...", "u.s...."
            stem = word[:-dots]
            if _ptb_keeps_period(stem + ".", next_word):
                stem, dots = stem + ".", dots - 1
            back, word = (["..."] if dots >= 3 else ["."] * dots) + back, stem
        elif word.endswith("'") and word.lower() not in _PTB_TRAILING_APOSTROPHE_WORDS:
            back, word = ["'"] + back, word[:-1]          # closing quote or plural possessive
        elif word.endswith(".") and not _ptb_keeps_period(word, next_word):
            back, word = ["."] + back, word[:-1]
        else:
            break
    if word.lower() in _PTB_SPECIAL_WORDS:
        return front + _PTB_SPECIAL_WORDS[word.lower()] + back
    clitic = _PTB_CONTRACTION.fullmatch(word)
    middle = [clitic.group(1), clitic.group(2)] if clitic else [word]
    return front + middle + back


def coco_caption_tokenize(text):
    """Tokenise a caption as the COCO caption evaluation does, without Java.

    pycocoevalcap runs Stanford PTBTokenizer (corenlp 3.4.1, -preserveLines -lowerCase) and
    then drops punctuation tokens. This re-implementation covers what captions contain:
    lower-casing, punctuation splitting, clitics ("dog's" -> dog 's, "don't" -> do n't),
    abbreviations that keep their period ("st.", "u.s."), brackets as kept "-lrb-" tokens, and
    the punctuation filter. Known divergences (rare in captions): PTB's special handling of
    URLs, e-mails, emoticons, SGML-like "<...>", odd apostrophes inside words ("rock'n'roll",
    kept whole here), unicode fractions and untokenisable characters (dropped by PTB).
    """
    text = _PTB_INITIAL_AT_SENTENCE_END.sub(r"\1 .", text.replace("\n", " "))
    for char, repl in _PTB_UNICODE.items():
        text = text.replace(char, repl)
    for pattern, repl in _PTB_SPLITS:
        text = pattern.sub(repl, text)
    chunks = text.split()
    tokens = []
    for i, chunk in enumerate(chunks):
        next_chunk = chunks[i + 1] if i + 1 < len(chunks) else ""
        tokens += _ptb_word(chunk, next_chunk)
    tokens = [t.lower() for t in tokens if t.strip(".")]  # runs of periods are punctuation
    return [t for t in tokens if t and t not in _PTB_DROPPED]


# ----------------------------------------------------------------------------------------------
# BLEU and CIDEr-D (pycocoevalcap)

def _tokenized_captions(candidates, references):
    """Check the {id: caption} / {id: [captions]} inputs and tokenise them, in a fixed id order."""
    if set(candidates) != set(references):
        missing = set(references) ^ set(candidates)
        raise ValueError(f"candidates and references must have the same ids; {len(missing)} "
                         f"differ, e.g. {sorted(missing, key=str)[:3]}")
    ids = list(references)
    cands, refs = [], []
    for key in ids:
        cand = candidates[key]
        if isinstance(cand, (list, tuple)):              # pycocoevalcap's [caption] form
            if len(cand) != 1:
                raise ValueError(f"candidates[{key!r}] must hold exactly one caption")
            cand = cand[0]
        if isinstance(references[key], str) or len(references[key]) == 0:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")
        cands.append(coco_caption_tokenize(cand))
        refs.append([coco_caption_tokenize(r) for r in references[key]])
    return ids, cands, refs


def _ngram_counts(tokens, n):
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(tokens) - k + 1))


def bleu(candidates, references, n=4):
    """Corpus BLEU-1..n exactly as pycocoevalcap's Bleu computes it.

    candidates: {id: caption}; references: {id: [caption, ...]}; both are tokenised with
    `coco_caption_tokenize`. Clipped n-gram matches and n-gram counts are summed over the corpus;
    the reference length of each caption is the one closest to the candidate's length (the
    shorter on ties), and the brevity penalty uses the corpus sums. No smoothing: the 1e-15 and
    1e-9 below only avoid 0/0, as in the original. Returns [BLEU-1, ..., BLEU-n].
    """
    _, cands, refs = _tokenized_captions(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, ref_list in zip(cands, refs):
        max_ref_counts = Counter()
        for ref in ref_list:
            max_ref_counts |= _ngram_counts(ref, n)     # | keeps the max count per n-gram
        for gram, count in _ngram_counts(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in ref_list)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))    # geometric mean of precisions 1..k+1
    ratio = (cand_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _cider_vector(counts, doc_freq, log_n_images, n):
    # tf-idf weights per n-gram order, their norms, and the "length" pycocoevalcap uses in the
    # length penalty: it counts the *bigrams* (its n == 1 index), i.e. words - 1. Kept as is.
    vec = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n_images - np.log(max(1.0, doc_freq[gram])))
    norms = [np.sqrt(sum(w * w for w in v.values())) for v in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length


def _cider_similarity(cand, ref, n, sigma):
    (c_vec, c_norm, c_len), (r_vec, r_norm, r_len) = cand, ref
    sims = np.zeros(n)
    for k in range(n):
        for gram, weight in c_vec[k].items():
            r_weight = r_vec[k].get(gram, 0.0)
            sims[k] += min(weight, r_weight) * r_weight  # CIDEr-D clips the candidate's weight
        if c_norm[k] != 0 and r_norm[k] != 0:
            sims[k] /= c_norm[k] * r_norm[k]
    return sims * np.e ** (-((c_len - r_len) ** 2) / (2 * sigma ** 2))


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D as pycocoevalcap's Cider computes it; returns (corpus_score, {id: score}).

    candidates: {id: caption}; references: {id: [caption, ...]}; tokenised with
    `coco_caption_tokenize`. Document frequencies come from the references of the evaluated set
    (an n-gram counts once per image), idf = log(#images) - log(max(1, df)); per n-gram order the
    clipped cosine similarity of tf-idf vectors, times a Gaussian length penalty (sigma 6); the
    mean over orders 1..n and over references, times 10. The corpus score is the mean.
    """
    ids, cands, refs = _tokenized_captions(candidates, references)
    cand_counts = [_ngram_counts(c, n) for c in cands]
    ref_counts = [[_ngram_counts(r, n) for r in ref_list] for ref_list in refs]
    doc_freq = Counter(gram for ref_list in ref_counts for gram in set().union(*ref_list))
    log_n_images = np.log(float(len(ids)))
    scores = {}
    for key, cand, ref_list in zip(ids, cand_counts, ref_counts):
        cand_vec = _cider_vector(cand, doc_freq, log_n_images, n)
        total = np.zeros(n)
        for ref in ref_list:
            total += _cider_similarity(cand_vec, _cider_vector(ref, doc_freq, log_n_images, n),
                                       n, sigma)
        scores[key] = float(np.mean(total) / len(ref_list) * 10.0)
    return float(np.mean(list(scores.values()))), scores


# ----------------------------------------------------------------------------------------------
# Image-text retrieval

def retrieval_recall(scores, text_to_image, ks=(1, 5, 10)):
    """Recall@k of image->text and text->image retrieval from a similarity matrix.

    scores: (n_images, n_texts) tensor or array, higher = more similar. text_to_image[j]: index
    of the image that text j describes (COCO/Flickr: 5 texts per image). An image is a hit at k
    if any of its texts is among its k best-scoring texts ("i2t", called "tr" text retrieval in
    ViLT/METER/FIBER logs); a text is a hit if its image is among its k best images ("t2i", their
    "ir"). Ties count against the correct item (a wrong candidate scoring equal ranks above
    it), so collapsed features with all scores equal get a recall of 0, never 100%.
    Returns {"i2t_r1": ..., "t2i_r1": ..., ...} as fractions in [0, 1].
    """
    scores = torch.as_tensor(scores).detach()                               # (Ni, Nt)
    scores = scores if scores.is_floating_point() else scores.float()
    owner = torch.as_tensor(text_to_image, device=scores.device).long()    # (Nt,)
    n_images, n_texts = scores.shape
    if owner.shape != (n_texts,) or owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"text_to_image must hold {n_texts} image indices in [0, {n_images})")
    if (torch.bincount(owner, minlength=n_images) == 0).any():
        raise ValueError("every image needs at least one text in text_to_image")
    own = scores[owner, torch.arange(n_texts, device=scores.device)]  # (Nt,) text vs its image
    is_own = torch.zeros_like(scores, dtype=torch.bool)                         # (Ni, Nt)
    is_own[owner, torch.arange(n_texts, device=scores.device)] = True
    # t2i: rank of a text's own image = number of other images scoring at least as high.
    t2i_rank = ((scores >= own[None, :]) & ~is_own).sum(dim=0)                 # (Nt,)
    # i2t: rank of an image's best own text = number of other texts scoring at least as high.
    best_own = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_own = best_own.scatter_reduce(0, owner, own, reduce="amax")            # (Ni,)
    i2t_rank = ((scores >= best_own[:, None]) & ~is_own).sum(dim=1)            # (Ni,)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out
