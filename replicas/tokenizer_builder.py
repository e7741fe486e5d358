"""A deterministic byte-level BPE tokenizer built with `tokenizers` from a small built-in corpus."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# Enough English, SQL and Python to give the merges something real to learn; no network needed.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Serving many fine-tuned adapters of one language model on a cluster of replicas needs careful batching.
Each request names its adapter; the router sends it to a replica that holds the adapter in memory.
Once upon a time there was a little model that learned to write poems, answer questions and summarise.
Please summarise the following text in one sentence. Translate the sentence into French. Hello, world!
SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY count(*) DESC LIMIT 10;
INSERT INTO orders (id, user_id, total) VALUES (1, 42, 19.99); UPDATE users SET active = true;
def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n
class Request:\n    def __init__(self, prompt, adapter_id=None):\n        self.prompt = prompt\n
for i in range(10):\n    print(i, i * i)\nimport numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n
The weather today is sunny with a light breeze. Tomorrow it will rain in the morning and clear later.
Question: What is the capital of France? Answer: Paris. Question: What is two plus two? Answer: four.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any UTF-8 text encodes; merges learned from the built-in corpus up to vocab_size."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    assert tokenizer.get_vocab_size() <= vocab_size, "tokenizer vocab must fit the model's embedding"
    return tokenizer
