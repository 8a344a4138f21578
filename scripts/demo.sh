#!/usr/bin/env bash
# The main job end to end on this machine: prepare the UCI SMS data and, when it is there, the
# SpamAssassin mail corpus, fine-tune one model per source, evaluate, classify, then run one
# `filterd serve` per source (SMS over Redis, mail over SMTP) and push real SMS and mail through them.
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
# One model per source (bench/RESULTS.md, "SMS and mail in one deployment": a joint model's ham FPR
# on SMS is 2-3 times an SMS-only model's), served by one filterd instance each.
echo "== 1. prepare: UCI SMS Spam Collection, undersampled, split 70/10/20 (seed 123)"
filterd-trainer prepare "${SMS_SOURCE[@]}" --out "$WORK/data-sms" --seed 123
if [ -d "$CORPUS" ]; then
  echo "   and the SpamAssassin mail corpus, on its own (a second model: one model per source)"
  filterd-trainer prepare --email-dir "$CORPUS" --out "$WORK/data-mail" --seed 123
else
  echo "   (no SpamAssassin corpus at $CORPUS: the SMS model also stands in for mail, and is not to be trusted there)"
fi

echo "== 2. fit"
if python -c 'from filterd.model.weights import resolve_base; resolve_base("gpt2")' 2>/dev/null; then
  BASE=gpt2; TRAINABLE=last-block
  echo "pretrained GPT-2 (124M) found: fine-tuning the last block, final norm and head"
else
  BASE=random:tiny; TRAINABLE=all
  echo "NOTE: no pretrained GPT-2 checkpoint here (no network); training a 2-layer GPT-2 from RANDOM"
  echo "      initialisation instead. Put a Hugging Face checkpoint in \$FILTERD_GPT2_DIR/gpt2 for the real thing."
fi
echo "-- the SMS model"
filterd-trainer fit --data "$WORK/data-sms" --base "$BASE" --trainable "$TRAINABLE" --out "$WORK/model-sms" > "$WORK/fit-sms.json"
MAIL_MODEL="$WORK/model-sms"
if [ -d "$CORPUS" ]; then
  echo "-- the mail model (the first 256 tokens of a mail: keeps the fit to a few minutes on a CPU)"
  filterd-trainer fit --data "$WORK/data-mail" --base "$BASE" --trainable "$TRAINABLE" --max-length 256 \
    --out "$WORK/model-mail" > "$WORK/fit-mail.json"
  MAIL_MODEL="$WORK/model-mail"
fi

echo "== 3. evaluate (balanced test split, and the natural-prior holdout of ham left out by balancing)"
echo "-- the SMS model"
filterd-trainer evaluate --model "$WORK/model-sms" --data "$WORK/data-sms" --split all
if [ -d "$CORPUS" ]; then
  echo "-- the mail model"
  filterd-trainer evaluate --model "$WORK/model-mail" --data "$WORK/data-mail" --split all
fi

echo "== 4. classify: SMS texts (the SMS model)"
filterd classify --model "$WORK/model-sms" \
  "WINNER!! As a valued customer you have been selected to receive a £900 prize reward! Call 09061701461" \
  "Are we still on for dinner tonight? I'll be there at 7" \
  "URGENT! Your mobile number has won a 2000 bonus caller prize. Text CLAIM to 81010 now" \
  "Sorry, I'll call you later, in a meeting"

MAIL=()
if [ -d "$CORPUS" ]; then
  echo "== 5. classify: raw mail from the SpamAssassin corpus (the mail model)"
  for f in "$CORPUS"/spam/00001.* "$CORPUS"/easy_ham/00001.*; do
    printf '%s  ' "$(basename "$(dirname "$f")")/$(basename "$f" | cut -c1-5)"
    filterd classify --model "$MAIL_MODEL" --email "$f"
  done
  MAIL=("$CORPUS"/spam/00001.* "$CORPUS"/spam/00002.* "$CORPUS"/easy_ham/00001.* "$CORPUS"/easy_ham/00002.*)
fi
echo "== model directories: $WORK/model-sms, $MAIL_MODEL (each has report.md and plots/)"

echo "== 6. filterd serve, one instance per source: SMS through a Redis stream, mail through SMTP"
python scripts/demo_serve.py --sms-model "$WORK/model-sms" --mail-model "$MAIL_MODEL" --work "$WORK" --mail "${MAIL[@]}"
