"""Source formats: the readers and what each format's files hold."""
