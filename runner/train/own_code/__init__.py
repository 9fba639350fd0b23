"""The user's own Keras code made resumable: ``runner.fit``, the ``Checkpointing`` callback for their own
``model.fit``, the state of the callbacks they pass, and the job session both share."""
