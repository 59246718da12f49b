"""What `taskyard up` runs: an embedded Redis, supervised children, the stack file."""
