"""P-tuning on FewCLUE (eprstmt, tnews): PET with the pattern's words replaced by trainable prompt tokens.

The template is "[unused1..4]{mask}[unused5..8]{text}": eight `[unused*]` rows of the token embedding become the
pattern, learned by gradient (`bert4x.techniques.prompt_tuning_model`, a `PromptEmbedding` that trains only those
rows). `--prompt-only` trains nothing else (the P-tuning setting for a real pretrained MLM); by default the whole
model trains too, since from scratch there is no pretrained MLM to keep frozen. Accuracy on test_public, zero-shot
(before training) and after few-shot training on train_few_all (+ masked LM on unlabelled test_public texts).

    python examples/ptuning_fewclue.py --task eprstmt
    python examples/ptuning_fewclue.py --task tnews --config bert_config.json --checkpoint bert_model.ckpt \
        --vocab vocab.txt --prompt-only
`--quick` is a < 1 min smoke run.
"""

from __future__ import annotations

import json
import sys

from pet_fewclue import PROMPT_TOKENS, PTUNING_TEMPLATES, parse_args, run

from bert4x.techniques import prompt_tuning_model


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    prompt_only = "--prompt-only" in argv
    if prompt_only:
        argv.remove("--prompt-only")
    args = parse_args(argv, description=__doc__)

    def make_trainable(mlm, pattern):
        prompt_ids = pattern.tokenizer.tokens_to_ids(PROMPT_TOKENS)
        return prompt_tuning_model(mlm, prompt_ids, train_model=not prompt_only)

    result = run(args, templates=PTUNING_TEMPLATES, make_trainable=make_trainable)
    result["trained"] = "prompt rows only" if prompt_only else "prompt rows + whole model"
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
