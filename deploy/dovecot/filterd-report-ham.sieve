# filterd: a message was copied or moved OUT of Junk: the user says it is not spam.
# Run by imapsieve (90-filterd-imapsieve.conf, imapsieve_mailbox2_before); compile with sievec.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

# imap.mailbox is where the message goes. Into the Trash says nothing: that is how users delete
# spam. Neither does Junk to Junk (imapsieve_mailbox2_name = * includes Junk). Add your clients'
# trash names here, as IMAP shows them (e.g. "INBOX.Trash" under a Maildir++ "INBOX." prefix).
if environment :is "imap.mailbox" ["Trash", "Deleted Items", "Deleted Messages", "Junk"] {
    stop;
}

# The IMAP user, for filterd-learn's log line only (filterd keeps one label store for everyone).
if environment :matches "imap.user" "*" {
    set "username" "${1}";
}

# :copy: learning is a side effect; the message still lands where the user put it.
pipe :copy "filterd-learn" ["ham", "${username}"];
