"""The exception family (exit codes, one class per meaning) and `one_line`, which every error message goes through."""

from __future__ import annotations

import tarfile

import pytest

from effconv.errors import (
    CheckpointError,
    EffconvError,
    MappingError,
    OutputError,
    ParityError,
    UsageError,
    one_line,
)


def test_exit_codes():
    assert {c: c.exit_code for c in (UsageError, CheckpointError, MappingError, OutputError, ParityError)} == {
        UsageError: 2,
        CheckpointError: 2,
        MappingError: 2,
        OutputError: 2,
        ParityError: 1,
    }


def test_an_output_error_is_no_usage_error():
    assert issubclass(OutputError, EffconvError) and not issubclass(OutputError, UsageError)
    assert not issubclass(OutputError, OSError)  # so a retry loop catching OSError does not swallow it


def test_one_line_joins_lines_and_drops_blanks_and_indents():
    assert one_line("first\n\n   second  \n\tthird") == "first; second; third"
    assert one_line(RuntimeError("only")) == "only"


def test_a_head_ending_in_a_colon_lists_the_rest_in_brackets():
    message = "Error(s) in loading state_dict:\n\tMissing key(s): a.\n\tUnexpected key(s): b."
    assert one_line(message) == "Error(s) in loading state_dict (Missing key(s): a.; Unexpected key(s): b.)"


def test_tarfiles_list_of_reasons(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\1" * 2048)
    with pytest.raises(tarfile.TarError) as e:
        tarfile.open(junk, mode="r:*")
    text = one_line(e.value)
    assert "\n" not in text and text.startswith("file could not be opened successfully (method gz: ")
    assert text.endswith(")") and "- method" not in text


def test_bullets_go_but_leading_dashes_of_options_stay():
    assert one_line("- one\n* two\n--arch b5 given\n-1 is negative") == "one; two; --arch b5 given; -1 is negative"


def test_max_lines_keeps_the_first_and_says_more_was_left_out():
    assert one_line("summary\nadvice\nmore advice", max_lines=1) == "summary ..."
    assert one_line("summary\nadvice", max_lines=2) == "summary; advice"
    assert one_line("summary", max_lines=1) == "summary"


def test_an_exception_without_a_message_is_named_by_its_type():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(EOFError("\n  \n")) == "EOFError"
    assert one_line("") == ""


def test_typed_puts_the_type_first():
    assert one_line(KeyError("Unable to open object"), typed=True) == "KeyError: 'Unable to open object'"
    assert one_line(OSError(), typed=True) == "OSError"
