"""How an image file becomes model input: the one decode + resize of the engine.

Validation (and training, before its flips) decode through
``decode_for_eval``, and so do --mode=predict and the exported SavedModel's
``serving_bytes`` signature. One function means a served or predicted image
is the very tensor validation measured: a model's probabilities on a file
cannot differ from its validation numbers by a resize method or a channel
count.

``error_line`` turns the TensorFlow error met while decoding one file into
the one-line message a user sees (it names the file or record).
"""

import re

import tensorflow as tf


def decode_for_eval(image_bytes, input_size, where="an image", declared=None):
    """RGB float32 [input_size, input_size, 3] in [0, 255] from PNG or JPEG bytes.

    Any channel count is decoded to RGB, then resized bilinearly (no crop, no
    aspect ratio kept: the embedded set and Planet are square). A payload
    that is not a PNG or JPEG fails naming `where`. declared: the record's
    (height, width), (0, 0) for none; a decoded image of another size fails
    naming `where` (many writers record it, and a mismatch means a bad record).
    """
    head = tf.strings.substr(image_bytes, 0, 4)
    ok = tf.logical_or(tf.equal(head, b"\x89PNG"), tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8"))
    check = tf.debugging.Assert(ok, [tf.strings.join([where, ": image is not a PNG or JPEG"])])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    if declared is not None:
        got = tf.shape(image, out_type=tf.int64)[:2]
        fits = tf.logical_or(tf.reduce_all(tf.equal(declared, 0)), tf.reduce_all(tf.equal(got, declared)))
        check = tf.debugging.Assert(fits, [tf.strings.join([
            where, ": image is ", tf.strings.as_string(got[0]), "x", tf.strings.as_string(got[1]),
            " but the record says ", tf.strings.as_string(declared[0]), "x",
            tf.strings.as_string(declared[1])])])
        with tf.control_dependencies([check]):
            image = tf.identity(image)
    return tf.image.resize(tf.cast(image, tf.float32), [input_size, input_size], method="bilinear")


def error_line(error, where=None):
    """One line from a TensorFlow error met while loading one image or record.

    Our own checks (decode_for_eval's, the label checks) already name the
    file and record; any other error is prefixed with `where`.
    """
    text = getattr(error, "message", None) or str(error)
    if "assertion failed:" in text:  # our own checks name file and record
        return text.split("assertion failed:", 1)[1].strip().splitlines()[0].strip("[] ")
    if "Summarized data:" in text:  # the same checks, run eagerly
        line = text.split("Summarized data:", 1)[1].strip().splitlines()[0]
        return re.sub(r"^b(['\"])(.*)\1$", r"\2", line)
    first = re.sub(r"^\{\{[^}]*\}\}\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    first = first[:150] or type(error).__name__
    what = "image does not decode" if isinstance(error, tf.errors.InvalidArgumentError) \
        else "cannot be read"
    return f"{where or 'a record'}: {what} ({first})"
