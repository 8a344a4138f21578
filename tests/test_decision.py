"""filterd.policy.decision: one spam decision from [policy] for every door (levels, soft reject, lists, doors)."""

from __future__ import annotations

import dataclasses

import pytest

from filterd.cli import main
from filterd.config import check_config
from filterd.policy.decision import ACTIONS, Decision, Message, Policy, decide
from filterd.errors import ConfigError


def policy(*sets: str) -> Policy:
    return Policy.from_config(check_config(None, ["redis.enabled=false", "smtp.quarantine_rcpt=q@x.org", *sets]))


def action(p: Policy, score: float, source: str = "milter", threshold: float = 0.5) -> str:
    return p.decide(Message(source), score, threshold).action


LEVELS = ["policy.tag_score=0.5", "policy.subject_score=0.7", "policy.quarantine_score=0.8",
          "policy.discard_score=0.9", "policy.reject_score=0.95"]  # fmt: skip


# --- levels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score, expected",
    [(0.0, "pass"), (0.4999, "pass"), (0.5, "tag"), (0.6999, "tag"), (0.7, "subject"), (0.8, "quarantine"),
     (0.8999, "quarantine"), (0.9, "discard"), (0.95, "reject"), (1.0, "reject")],
)  # fmt: skip
def test_each_level_starts_exactly_at_its_score(score, expected):
    d = policy(*LEVELS).decide(Message("milter"), score, 0.5)
    assert d.action == expected
    assert d.verdict == ("spam" if score >= 0.5 else "ham") and d.score == score and d.threshold == 0.5
    assert len(d.reasons) == 1 and d.reasons[0].startswith(f"score {score:.4f}")


def test_default_policy_is_todays_behaviour_tag_at_the_models_threshold():
    p = policy()
    for source in ("smtp", "milter", "http", "redis"):
        assert action(p, 0.6999, source, threshold=0.7) == "pass"
        d = p.decide(Message(source), 0.7, 0.7)
        assert (d.verdict, d.action, d.threshold) == ("spam", "tag", 0.7)
    assert decide(Message("smtp"), 0.2, None, 0.2).action == "tag"  # module function, default policy


def test_a_level_below_the_spam_threshold_acts_at_the_threshold():
    p = policy("policy.subject_score=0.3")  # tag = "model"; the model says 0.6
    assert action(p, 0.5, threshold=0.6) == "pass"  # ham is never acted on
    assert action(p, 0.6, threshold=0.6) == "subject"


def test_soft_reject_band_below_the_spam_threshold():
    p = policy("policy.soft_reject_score=0.3", "policy.tag_score=0.5", "policy.reject_score=0.9")
    assert action(p, 0.2999) == "pass"
    d = p.decide(Message("milter"), 0.3, 0.5)
    assert (d.verdict, d.action) == ("ham", "soft-reject")  # unsure: deferred, not spam
    assert action(p, 0.4999) == "soft-reject"
    assert action(p, 0.5) == "tag"
    assert action(p, 0.9) == "reject"


def test_soft_reject_band_between_levels_and_ties():
    p = policy("policy.tag_score=0.5", "policy.soft_reject_score=0.6", "policy.subject_score=0.8")
    assert [action(p, s) for s in (0.55, 0.6, 0.79, 0.8)] == ["tag", "soft-reject", "soft-reject", "subject"]
    tie = policy("policy.tag_score=0.5", "policy.soft_reject_score=0.5")
    assert action(tie, 0.5) == "tag"  # at a tie the other level wins


# --- doors -----------------------------------------------------------------------------


def test_per_door_overrides():
    p = policy("policy.tag_score=0.5", "policy.subject_score=0.8", "policy.redis.tag_score=0.9", "policy.redis.subject_score=0.95",
               "policy.http.subject_score=off", "policy.smtp.quarantine_score=0.85")  # fmt: skip
    assert [action(p, s, "redis") for s in (0.85, 0.9, 0.95)] == ["pass", "tag", "subject"]
    assert action(p, 0.85, "http") == "tag"
    assert action(p, 0.85, "milter") == "subject"
    assert action(p, 0.85, "smtp") == "quarantine"
    assert p.decide(Message("redis"), 0.85, 0.5).verdict == "ham"


def test_doors_skip_what_they_cannot_do():
    p = policy("policy.tag_score=0.5", "policy.quarantine_score=0.8", "policy.reject_score=0.9",
               "policy.soft_reject_score=0.3", "smtp.quarantine_rcpt=q@x.org")  # fmt: skip
    assert action(p, 0.95, "milter") == "reject" and action(p, 0.95, "http") == "reject"
    assert action(p, 0.95, "smtp") == "quarantine"  # after the queue: [policy] reject_score is not for it
    assert action(p, 0.95, "redis") == "quarantine"  # nobody to refuse
    assert action(p, 0.4, "milter") == "soft-reject"
    assert action(p, 0.4, "smtp") == "pass" and action(p, 0.4, "redis") == "pass"  # no band there
    assert p.actions("smtp") == {"pass", "tag", "quarantine"}
    assert p.actions("milter") == {"pass", "soft-reject", "tag", "quarantine", "reject"}
    own = policy("policy.tag_score=0.5", "policy.smtp.reject_score=0.9")
    assert action(own, 0.95, "smtp") == "reject"  # its own section: before-queue use (smtpd_proxy_filter)


def test_legacy_smtp_action_and_model_threshold_map_onto_the_policy():
    p = policy('smtp.action="subject"', "model.threshold=0.7")
    assert action(p, 0.6999, "smtp") == "pass"
    assert action(p, 0.7, "smtp") == "subject"
    assert action(p, 0.7, "redis") == "tag"  # [smtp] action is the smtp door's only
    assert action(p, 0.65, "redis", threshold=0.6) == "pass"  # [model] threshold overrides the model's own
    legacy = policy('smtp.action="discard"')
    assert action(legacy, 0.5, "smtp") == "discard" and action(legacy, 0.4999, "smtp") == "pass"


def test_check_config_prints_a_deprecation_line_per_old_key(tmp_path, capsys):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[model]\nthreshold = 0.7\n[smtp]\naction = "reject"\n[redis]\nenabled = false\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "deprecated: [model] threshold is deprecated: set [policy] tag_score = 0.7 instead" in err
    assert any(line.startswith("deprecated: [smtp] action is deprecated") and "reject_score = 0.7" in line for line in err)
    assert any("backscatter" in line for line in err)  # the warning stays
    cfg.write_text("[policy]\ntag_score = 0.7\n[redis]\nenabled = false\n")
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert "deprecat" not in capsys.readouterr().err


# --- lists -----------------------------------------------------------------------------


LISTS = ['policy.allow_senders=["boss@Example.COM", "friends.example"]', 'policy.deny_senders=["spam.example"]',
         'policy.allow_recipients=["postmaster@ours.example"]', 'policy.deny_recipients=["trap@ours.example"]',
         "policy.tag_score=0.5", "policy.quarantine_score=0.9", "policy.milter.reject_score=0.95"]  # fmt: skip


@pytest.mark.parametrize(
    "sender, rcpts, verdict, act, listed",
    [
        ("boss@example.com", ("a@ours.example",), "ham", "pass", "allow_senders"),  # by address
        ("BOSS@EXAMPLE.COM", ("a@ours.example",), "ham", "pass", "allow_senders"),  # case-insensitive
        ("other@example.com", ("a@ours.example",), None, None, ""),  # another address there: scored
        ("x@Friends.Example", ("a@ours.example",), "ham", "pass", "allow_senders"),  # by domain
        ("x@mail.friends.example", ("a@ours.example",), "ham", "pass", "allow_senders"),  # and its subdomains
        ("x@notfriends.example", ("a@ours.example",), None, None, ""),  # a suffix is not a subdomain
        ("x@SPAM.example", ("a@ours.example",), "spam", "reject", "deny_senders"),  # the door's top level
        ("x@a.com", ("postmaster@ours.example",), "ham", "pass", "allow_recipients"),
        ("x@a.com", ("postmaster@ours.example", "a@ours.example"), None, None, ""),  # every recipient must be
        ("x@a.com", ("a@ours.example", "Trap@Ours.Example"), "spam", "reject", "deny_recipients"),  # one trap is enough
        ("x@spam.example", ("postmaster@ours.example",), "ham", "pass", "allow_recipients"),  # allow wins over deny
        ("", ("a@ours.example",), None, None, ""),  # the null sender matches nothing
    ],
)
def test_allow_and_deny_lists(sender, rcpts, verdict, act, listed):
    p = policy(*LISTS)
    m = Message("milter", sender, rcpts)
    d = p.listed(m)
    if verdict is None:
        assert d is None and p.decide(m, 0.1).action == "pass"
        return
    assert d is not None and (d.verdict, d.action, d.score, d.listed) == (verdict, act, None, listed)
    assert p.decide(m, 0.1) == d == p.decide(m, 0.99)  # the model's score does not matter
    assert listed in d.reasons[0] and d.reasons[1] == "not scored"


def test_deny_listed_gets_each_doors_top_level():
    p = policy(*LISTS, "smtp.quarantine_rcpt=q@x.org")
    m = dataclasses.replace(Message("milter", "x@spam.example"))
    assert {s: p.decide(dataclasses.replace(m, source=s), None).action for s in ("milter", "http", "smtp", "redis")} == {
        "milter": "reject", "http": "quarantine", "smtp": "quarantine", "redis": "quarantine",
    }  # fmt: skip


def test_no_score_and_no_list_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="no score"):
        policy().decide(Message("smtp"), None)
    with pytest.raises(ValueError, match="source must be one of smtp, milter, http, redis"):
        Message("sms")


def test_decision_is_frozen_and_actions_are_known():
    d = policy().decide(Message("http"), 0.9)
    assert isinstance(d, Decision) and d.action in ACTIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.action = "reject"  # type: ignore[misc]


# --- bad [policy]: one line naming the key -----------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["policy.subject_score=0.9", "policy.quarantine_score=0.8"],
         "--set policy.quarantine_score: [policy] quarantine_score: 0.8 is below [policy] subject_score (0.9)"),
        (["policy.reject_score=0.9", "policy.milter.discard_score=0.95"],
         "[policy] reject_score: 0.9 is below [policy.milter] discard_score (0.95) for milter"),
        (["policy.tag_score=0.6", "policy.redis.subject_score=0.5"],
         "[policy.redis] subject_score: 0.5 is below [policy] tag_score (0.6) for redis"),
        (["policy.smtp.soft_reject_score=0.3"], "[policy.smtp] soft_reject_score: the after-queue SMTP filter cannot defer"),
        (["policy.redis.reject_score=0.99"], "[policy.redis] reject_score: redis cannot refuse a message"),
        (["policy.redis.soft_reject_score=0.3"], "[policy.redis] soft_reject_score: redis cannot defer a message"),
        (["policy.tag_score=off"], '[policy] tag_score: the spam threshold cannot be "off"'),
        (["policy.http.tag_score=off"], '[policy.http] tag_score: the spam threshold cannot be "off"'),
        (["policy.reject_score=1.5"], '[policy] reject_score: must be a number in 0..1, "model", "off", got 1.5'),
        (["policy.reject_score=inherit"], '[policy] reject_score: must be a number in 0..1, "model", "off", got "inherit"'),
        (["policy.smtp.reject_score=maybe"], '[policy.smtp] reject_score: must be a number in 0..1, "model", "off", "inherit"'),
        (['policy.allow_senders="a@b.c"'], "[policy] allow_senders: must be an array of addresses or domains"),
        (['policy.deny_senders=["a b@c.d"]'], "[policy] deny_senders: not an address or domain: 'a b@c.d'"),
        (['policy.deny_recipients=["user@"]'], "[policy] deny_recipients: not an address or domain"),
        (["model.threshold=0.7", "policy.tag_score=0.6"], "[model] threshold: deprecated, and [policy] tag_score is set too"),
        (['smtp.action="subject"', "policy.smtp.subject_score=0.9"], "[smtp] action: deprecated, and [policy.smtp] subject_score is set too"),
        (["policy.quarantine_score=0.9"], "[smtp] quarantine_rcpt: required when a quarantine_score applies to the smtp door"),
    ],
)  # fmt: skip
def test_bad_policy_is_a_one_line_error_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as e:
        check_config(None, ["redis.enabled=false", *sets])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_policy_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "filterd.toml"
    f.write_text("[policy]\ntag_score = 0.5\nsubject_score = 0.4\n[redis]\nenabled = false\n")
    with pytest.raises(ConfigError, match=rf"^{f}: \[policy\] subject_score: 0.4 is below \[policy\] tag_score \(0.5\)"):
        check_config(f)
    f.write_text('[policy]\ntag_score = 0.5\nreject_score = 0.99\nallow_senders = ["a@b.example"]\n[policy.smtp]\n'
                 'discard_score = 0.99\n[redis]\nenabled = false\n')  # fmt: skip
    c = check_config(f)
    assert c.warnings() == []  # [policy] reject_score is not the after-queue door's: no backscatter warning
    assert check_config(f, ["policy.smtp.reject_score=0.995"]).warnings()[-1].startswith("[policy.smtp] reject_score suits")
