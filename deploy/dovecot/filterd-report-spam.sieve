# filterd: a message was copied, moved or appended INTO Junk: the user says it is spam.
# Run by imapsieve (90-filterd-imapsieve.conf, imapsieve_mailbox1_before); compile with sievec.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

# The IMAP user, for filterd-learn's log line only (filterd keeps one label store for everyone).
if environment :matches "imap.user" "*" {
    set "username" "${1}";
}

# :copy: learning is a side effect; the message still lands in Junk whatever the pipe does.
pipe :copy "filterd-learn" ["spam", "${username}"];
