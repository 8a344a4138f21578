"""The web console: the verdict history, each verdict's explanation, learn buttons, model versions and
rollback, and a box to score a pasted message. Served by `filterd serve` on `[console] listen`.

Pages (server-rendered HTML, no JavaScript at all)
    `GET /history`         decisions newest first; filters verdict, action, source, since/until (UTC);
                           paging by id (`before`).
    `GET /verdict/<id>`    one decision: its fields and the explanation, the words highlighted in the
                           stored text (`<mark>`, red raised P(spam), green lowered it, darker = more) or,
                           when the text is not stored, the word list; "learn as spam/ham" buttons.
    `POST /verdict/<id>/learn`  label=spam|ham: the stored text into the label store ([trainer] store) as
                           `filterd-trainer learn` puts it there (source "console").
    `GET /models`          the versions in [trainer] models_dir with their evaluation metrics and refit
                           facts (filterd.json); `POST /models/rollback`: ModelStore.rollback, which the
                           daemon's model watcher then loads like any new model.
    `GET|POST /classify`   paste a message: its score, and its explanation when filterd.model.explain exists.

Security
    Password: HTTP Basic (any user name) checked on every request when `[console] password` is set;
    mandatory off loopback (check-config). Without a password only loopback Host names are served (a DNS
    rebinding page cannot reach the console under its own name).
    Cross-site requests: every form POST needs (1) an Origin (else Referer) equal to this console's own
    origin and (2) a token, HMAC(process secret, session cookie), that a page of another site cannot
    read; the session cookie is HttpOnly and SameSite=Strict. All text is escaped with html.escape; a
    strict Content-Security-Policy (no script at all, styles only from /console.css) is a second wall.

HTTP: filterd/net/http.py's server (as the scan API and the metrics), routes of our own.

The buttons must write exactly what `filterd-trainer learn` and `rollback` write, so they call the same
LabelStore and ModelStore (filterd.store.labels and .models, which the trainer uses too), lazily.
"""

from filterd.console.render import highlight
from filterd.console.server import Console

__all__ = ["Console", "highlight"]
