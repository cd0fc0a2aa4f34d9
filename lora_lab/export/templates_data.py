'''The data section of the exported scripts (``DATA``): reading rows, rendering prompts, closing the
assistant turn, tokenizing, packing and counting tokens.  :mod:`lora_lab.export.templates` has the
rest of the first half (``HEAD``, ``COMMON``).  Text only: lora_lab never runs it.

Its functions are line-for-line the rules of :mod:`lora_lab.hf.data.prepare`, :mod:`.turns` and
:mod:`.packing`; ``tests/export`` checks that ``tokenize`` gives :func:`lora_lab.prepare_dataset`'s
rows, that ``PadCollator`` gives ``pad_batch``'s batch and that ``count_tokens`` is
``batch_tokens``.
'''

DATA = '''

# ----------------------------------------------------------------------------- the rows
def read_jsonl(path):
    return datasets.load_dataset("json", data_files=str(path), split="train").to_list()


def read_source(source):
    """(train rows, eval rows or None) of a .json/.jsonl/.csv/.tsv file, a save_to_disk folder or
    a hub dataset (its 'train' split, and 'validation' or 'test' as eval)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:  # keeps "42" a string
            return list(csv.DictReader(f, delimiter="\\t" if path.suffix.lower() == ".tsv" else ",")), None
    if path.is_file():
        return read_jsonl(path), None
    ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source)
    if isinstance(ds, datasets.DatasetDict):
        train = "train" if "train" in ds else next(iter(ds))
        ev = next((s for s in ("validation", "test") if s in ds and s != train), None)
        return ds[train].to_list(), (ds[ev].to_list() if ev else None)
    return ds.to_list(), None


def split_eval(rows, fraction, seed):
    """Hold out round(n * fraction) rows (at least 1, never all), chosen by `seed`."""
    n = len(rows)
    if fraction <= 0 or n < 2:
        return rows, None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:min(n - 1, max(1, round(n * fraction)))])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def load_rows():
    """Train and eval rows: the files written at export time, or DATA["source"] split here."""
    if DATA["source"] is None:
        return (read_jsonl(HERE / DATA["train"]),
                read_jsonl(HERE / DATA["eval"]) if DATA["eval"] else None)
    train, ev = read_source(DATA["source"])
    if FORMAT["eval_fraction"] == 0:
        return train, None
    return (train, ev) if ev is not None else split_eval(train, FORMAT["eval_fraction"], FORMAT["seed"])


def prompts_and_responses(rows):
    """Per row: the prompt (a string, or the messages before the last assistant turn) and the
    response (a string, or that last assistant message's content)."""
    p, r, m = FORMAT["prompt_column"], FORMAT["response_column"], FORMAT["messages_column"]
    if p in rows[0] and r in rows[0]:
        return [row[p] for row in rows], [row[r] for row in rows]
    prompts, responses = [], []
    for i, row in enumerate(rows):
        msgs = [{"role": x["role"], "content": x["content"]} for x in row[m]]
        last = max((j for j, x in enumerate(msgs) if x["role"] == "assistant"), default=None)
        if not last:
            raise SystemExit(f"row {i} has no assistant message after a prompt")
        prompts.append(msgs[:last])
        responses.append(msgs[last]["content"])
    return prompts, responses


# ----------------------------------------------------------------------------- prompt and answer
def as_messages(prompt) -> list:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def uses_chat_template(tokenizer) -> bool:
    return bool(FORMAT["use_chat_template"] and getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt) -> str:
    """The text before the response: the chat template with the generation prompt when the
    tokenizer has one (and FORMAT["use_chat_template"]), else FORMAT["template"]."""
    messages = as_messages(prompt)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        prompt = (messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user"
                  else "\\n".join(f"{x['role']}: {x['content']}" for x in messages))
    return FORMAT["template"].format(prompt=prompt)


def template_response(tokenizer, messages, response: str, prompt_text: str) -> str:
    """What the chat template writes for the assistant turn after the prompt, as TRL supervises it:
    ChatML writes "46<|im_end|>\\\\n" -- the answer, the end-of-turn marker and what follows it."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(prompt_text):
        raise SystemExit("The chat template writes the prompt differently when the answer follows, so "
                         "the response cannot be cut from the conversation.  Use another chat "
                         "template, or set FORMAT['use_chat_template'] = False.")
    return full[len(prompt_text):]


def special_ids(tokenizer) -> set:
    """bos/eos/pad/unk and every added token marked special (such as <|im_end|>)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def close_turn(tokenizer, ids: list, written: str, content: str, specials: set) -> list:
    """The response ids `ids` (of the template's text `written`), plus eos when the template writes
    no special token after the answer `content` (then nothing would ever end the turn)."""
    content = content.strip()
    at = written.rfind(content) if content else -1
    tail = written[at + len(content):] if at >= 0 else written
    if any(t in specials for t in tokenizer(tail, add_special_tokens=False)["input_ids"]):
        return list(ids)
    return list(ids) + [tokenizer.eos_token_id]


def response_ids(tokenizer, prompts, responses, texts) -> list:
    """Each response's supervised ids, ending the turn as the model will have to end it: with a
    chat template, the tokens the template writes after the prompt text `texts[k]` (closed by
    close_turn); without one, the response and eos."""
    if not uses_chat_template(tokenizer):
        ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        return [list(r) + [tokenizer.eos_token_id] for r in ids]
    written = [template_response(tokenizer, as_messages(p), r, t)
               for p, r, t in zip(prompts, responses, texts)]
    ids = tokenizer(written, add_special_tokens=False)["input_ids"]
    specials = special_ids(tokenizer)
    return [close_turn(tokenizer, i, w, r, specials) for i, w, r in zip(ids, written, responses)]


def bos_prefix(tokenizer) -> list:
    """[bos_token_id] when the tokenizer adds a BOS by itself (Llama does), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


# ----------------------------------------------------------------------------- tokenize and pack
def tokenize(rows, tokenizer, packing: bool = False):
    """input_ids = [BOS] prompt response END; labels = -100 over the prompt (when
    FORMAT["train_on_responses_only"]), then response END.  END closes the turn (response_ids).
    Prompt and response are tokenized apart, so the prompt ids are exactly those of generation.
    The first max_length tokens are kept; a row whose prompt alone fills max_length is dropped.
    Unpacked rows get an all-ones attention_mask; `packing` packs them (pack)."""
    prompts, responses = prompts_and_responses(rows)
    bos, L = bos_prefix(tokenizer), FORMAT["max_length"]
    texts = [format_prompt(tokenizer, p) for p in prompts]
    p_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples = []
    for p, r in zip(p_ids, response_ids(tokenizer, prompts, responses, texts)):
        p = list(p) if not bos or p[:1] == bos else bos + list(p)  # a template may hold <s>
        if len(p) >= L:
            continue
        p_labels = [IGNORE_INDEX] * len(p) if FORMAT["train_on_responses_only"] else p
        examples.append({"input_ids": (p + r)[:L], "labels": (p_labels + r)[:L]})
    if not examples:
        raise SystemExit(f"Every row was truncated away: no response token fits in max_length = {L}. "
                         "Raise FORMAT['max_length'], or shorten the prompts.")
    if packing:
        return datasets.Dataset.from_list(pack(examples, L))
    for e in examples:
        e["attention_mask"] = [1] * len(e["input_ids"])
    return datasets.Dataset.from_list(examples)


def pack(examples, max_length: int) -> list:
    """Whole examples, in order, into rows of <= max_length tokens, each example attending only to
    itself.  position_ids restart at 0 for every example and the row gets NO attention_mask:

        input_ids    = [ a0 a1 a2 | b0 b1 | c0 c1 c2 ]
        position_ids = [ 0  1  2  | 0  1  | 0  1  2  ]

    transformers then builds a block-diagonal causal mask from the position_ids (a new example
    starts wherever the position does not go up by one), so every token's loss is its loss alone.
    That needs the model called without attention_mask (PadCollator) and without a KV cache
    (load_model sets config.use_cache = False).  The first label of every example is -100: the
    loss shifts labels by one, so it would be the target of the previous example's last token."""
    packs = []
    for ex in examples:
        ids = ex["input_ids"]
        if not packs or len(packs[-1]["input_ids"]) + len(ids) > max_length:
            packs.append({"input_ids": [], "position_ids": [], "labels": []})
        packs[-1]["input_ids"] += ids
        packs[-1]["position_ids"] += list(range(len(ids)))
        packs[-1]["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
    return packs


def count_tokens(batch) -> int:
    """The non-padding tokens of a batch from PadCollator: attention_mask.sum(), or for packed rows
    (no mask) the tokens before each row's padding, which is the run of position-0 tokens at the
    row's end (an example has at least a prompt token and END, so none ends at position 0)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    real = batch["position_ids"] != 0                          # (B, T)
    after_last = real.shape[1] - real.long().flip(1).argmax(1)  # 1 + index of the last real position
    return int(torch.where(real.any(1), after_last, 0).sum())
'''
