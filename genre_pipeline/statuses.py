"""What became of a movie's poster: the `status` of its label row, shared by fetching, training and labelling."""

STATUS_OK = "ok"
STATUS_MISSING = "missing_poster"
STATUS_UNREADABLE = "unreadable_poster"
STATUS_FETCH_FAILED = "fetch_failed"
STATUS_REFUSED = "refused_poster"  # outside the poster roots, not a regular file, or too large
STATUS_INFERENCE_FAILED = "inference_failed"  # the model raised on the block this row was scored in
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_UNREADABLE, STATUS_FETCH_FAILED, STATUS_REFUSED,
            STATUS_INFERENCE_FAILED)
