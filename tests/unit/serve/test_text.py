"""Incremental detokenization: stop strings cut exactly, held-back text is never lost or sent twice."""

from fedtune.serve.text import ByteTokenizer, TextStream

TOK = ByteTokenizer()


def feed(stream, text):
    pieces, stopped = [], False
    for b in text.encode():
        piece, stopped = stream.push(b)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped


def test_stop_string_cuts_and_partial_matches_are_held_back():
    s = TextStream(TOK, ("END",))
    pieces, stopped = feed(s, "abc ENx EN END more")
    assert stopped and "".join(pieces) == "abc ENx EN " and s.text == "abc ENx EN "
    assert pieces[4] == "" and pieces[5] == ""  # "E", "EN" could still become "END"


def test_no_stop_sends_everything_once_multibyte_included():
    s = TextStream(TOK, ("zz",))
    pieces, stopped = feed(s, "héllo wörld z")
    assert not stopped and "".join(pieces) + s.finish() == "héllo wörld z"
    assert "\ufffd" not in "".join(pieces)  # half a character is never sent


def test_chat_template_for_the_byte_model():
    ids = TOK.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    assert TOK.decode(ids) == "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"
