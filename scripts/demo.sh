#!/usr/bin/env bash
# The main job end to end on this machine: prepare the UCI SMS data and, when it is there, the
# SpamAssassin mail corpus (one model for both: bench/RESULTS.md, "SMS and mail in one deployment"),
# fine-tune, evaluate, classify, then run `filterd serve` with Redis and SMTP and push real SMS and
# mail through it.
# Uses pretrained GPT-2 when a checkpoint can be found (local Hugging Face cache, $FILTERD_GPT2_DIR,
# or a download); otherwise says so and trains a small model from random initialisation.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DEMO_DIR:-work/demo}
SHARED=${FILTERD_SHARED:-../shared}
SMS="$SHARED/data/sms-spam-collection/SMSSpamCollection"
CORPUS="$SHARED/data/spamassassin-publiccorpus"
mkdir -p "$WORK"

SMS_SOURCE=(--download-sms)
[ -f "$SMS" ] && SMS_SOURCE=(--sms "$SMS")
if [ -d "$CORPUS" ]; then
  echo "== 1. prepare: UCI SMS Spam Collection + SpamAssassin mail, each undersampled and split 70/10/20 (seed 123)"
  MAIL_SOURCE=(--email-dir "$CORPUS"); TRAINED_ON="SMS and mail"
  FIT_EXTRA=(--max-length 256)  # the first 256 tokens of a mail: keeps the fit to a few minutes on a CPU
else
  echo "== 1. prepare: UCI SMS Spam Collection, undersampled, split 70/10/20 (seed 123)"
  echo "      (no SpamAssassin corpus at $CORPUS: an SMS-only model, which is not to be trusted on mail)"
  MAIL_SOURCE=(); TRAINED_ON="SMS only"; FIT_EXTRA=()
fi
filterd-trainer prepare "${SMS_SOURCE[@]}" "${MAIL_SOURCE[@]}" --out "$WORK/data" --seed 123

echo "== 2. fit"
if python -c 'from filterd.weights import resolve_base; resolve_base("gpt2")' 2>/dev/null; then
  BASE=gpt2; TRAINABLE=last-block
  echo "pretrained GPT-2 (124M) found: fine-tuning the last block, final norm and head"
else
  BASE=random:tiny; TRAINABLE=all
  echo "NOTE: no pretrained GPT-2 checkpoint here (no network); training a 2-layer GPT-2 from RANDOM"
  echo "      initialisation instead. Put a Hugging Face checkpoint in \$FILTERD_GPT2_DIR/gpt2 for the real thing."
fi
filterd-trainer fit --data "$WORK/data" --base "$BASE" --trainable "$TRAINABLE" "${FIT_EXTRA[@]}" --out "$WORK/model" > "$WORK/fit.json"

echo "== 3. evaluate (balanced test split, and the natural-prior holdout of ham left out by balancing)"
filterd-trainer evaluate --model "$WORK/model" --data "$WORK/data" --split all

echo "== 4. classify: SMS texts"
filterd classify --model "$WORK/model" \
  "WINNER!! As a valued customer you have been selected to receive a £900 prize reward! Call 09061701461" \
  "Are we still on for dinner tonight? I'll be there at 7" \
  "URGENT! Your mobile number has won a 2000 bonus caller prize. Text CLAIM to 81010 now" \
  "Sorry, I'll call you later, in a meeting"

if [ -d "$CORPUS" ]; then
  echo "== 5. classify: raw mail (SpamAssassin corpus; this model was trained on $TRAINED_ON)"
  for f in "$CORPUS"/spam/00001.* "$CORPUS"/easy_ham/00001.*; do
    printf '%s  ' "$(basename "$(dirname "$f")")/$(basename "$f" | cut -c1-5)"
    filterd classify --model "$WORK/model" --email "$f"
  done
fi
echo "== model directory: $WORK/model (report: $WORK/model/report.md, plots: $WORK/model/plots/)"

echo "== 6. filterd serve: SMS through a Redis stream, mail through SMTP"
MAIL=()
if [ -d "$CORPUS" ]; then
  MAIL=("$CORPUS"/spam/00001.* "$CORPUS"/spam/00002.* "$CORPUS"/easy_ham/00001.* "$CORPUS"/easy_ham/00002.*)
fi
python scripts/demo_serve.py --model "$WORK/model" --work "$WORK" --trained-on "$TRAINED_ON" --mail "${MAIL[@]}"
