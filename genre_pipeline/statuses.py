"""What became of a movie's label row (its poster, and for a fusion model its other signals): the `status` column,
shared by fetching, training and labelling."""

STATUS_OK = "ok"
STATUS_MISSING = "missing_poster"
STATUS_UNREADABLE = "unreadable_poster"
STATUS_FETCH_FAILED = "fetch_failed"
STATUS_REFUSED = "refused_poster"  # outside the poster roots, not a regular file, or too large
STATUS_INFERENCE_FAILED = "inference_failed"  # the model raised on the block this row was scored in
# A fusion model's rows: scored without some of its signals (`signals` lists those used, `error` why the others
# are missing), or not scored for want of any (a model without the poster signal; with it, the poster's status).
STATUS_PARTIAL = "partial_signals"
STATUS_NO_SIGNALS = "no_signals"
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_UNREADABLE, STATUS_FETCH_FAILED, STATUS_REFUSED,
            STATUS_INFERENCE_FAILED, STATUS_PARTIAL, STATUS_NO_SIGNALS)
