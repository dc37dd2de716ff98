"""res_agi's usage texts, as Asterisk 22.10.1 sends them for a malformed command.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations


def _usage(*lines: str) -> str:
    body = "".join(f"{line}\n" for line in lines)
    return f"520-Invalid command syntax.  Proper usage follows:\n{body}520 End of proper usage."


# res_agi's usage text is the command's XML <description> (ast_xmldoc_build_description, at
# registration): one line per paragraph, white space collapsed, inline markup such as
# <literal> left in, list items indented. As Asterisk 22.10.1 sends it (with its documentation
# installed; tests/asterisk/test_differential.py compares every reachable one).
_USAGE = {
    # Unreachable: handle_answer never asks for its usage (kept from the XML for completeness).
    "ANSWER": _usage(
        "Answers channel if not already in answer state. Returns <literal>-1</literal> on "
        "channel failure, or <literal>0</literal> if successful."
    ),
    "CHANNEL STATUS": _usage(
        "Returns the status of the specified <replaceable>channelname</replaceable>. If no "
        "channel name is given then returns the status of the current channel.",
        "Return values:",
        "    <enum>0</enum> - Channel is down and available.",
        "    <enum>1</enum> - Channel is down, but reserved.",
        "    <enum>2</enum> - Channel is off hook.",
        "    <enum>3</enum> - Digits (or equivalent) have been dialed.",
        "    <enum>4</enum> - Line is ringing.",
        "    <enum>5</enum> - Remote end is ringing.",
        "    <enum>6</enum> - Line is up.",
        "    <enum>7</enum> - Line is busy.",
    ),
    "GET DATA": _usage(
        "Stream the given <replaceable>file</replaceable>, and receive DTMF data.",
        "Returns the digits received from the channel at the other end.",
    ),
    "STREAM FILE": _usage(
        "Send the given file, allowing playback to be interrupted by the given digits, if any. "
        "Returns <literal>0</literal> if playback completes without a digit being pressed, or "
        "the ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> "
        "on error or if the channel was disconnected. If musiconhold is playing before "
        "calling stream file it will be automatically stopped and will not be restarted after "
        "completion.",
        "It sets the following channel variables upon completion:",
        "<variable>PLAYBACKSTATUS</variable>: The status of the playback attempt as a text string.",
        "    <value>SUCCESS</value>",
        "    <value>FAILED</value>",
    ),
    "SAY DIGITS": _usage(
        "Say a given digit string, returning early if any of the given DTMF digits are "
        "received on the channel. Returns <literal>0</literal> if playback completes without "
        "a digit being pressed, or the ASCII numerical value of the digit if one was pressed "
        "or <literal>-1</literal> on error/hangup."
    ),
    "WAIT FOR DIGIT": _usage(
        "Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a "
        "DTMF digit. Returns <literal>-1</literal> on channel failure, <literal>0</literal> if "
        "no digit is received in the timeout, or the numerical value of the ascii of the digit "
        "if one is received. Use <literal>-1</literal> for the <replaceable>timeout</replaceable> "
        "value if you desire the call to block indefinitely."
    ),
    "SET VARIABLE": _usage("Sets a variable to the current channel."),
    "GET VARIABLE": _usage(
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        "Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and "
        "returns the variable in parentheses.",
        "Example return code: 200 result=1 (testvariable)",
    ),
    "GET FULL VARIABLE": _usage(
        "Evaluates the given <replaceable>expression</replaceable> against the channel "
        "specified by <replaceable>channelname</replaceable>, or the current channel if "
        "<replaceable>channelname</replaceable> is not provided.",
        "Unlike GET VARIABLE, the <replaceable>expression</replaceable> is processed in a "
        "manner similar to dialplan evaluation, allowing complex and built-in variables to be "
        "accessed, e.g. <literal>The time is ${EPOCH}</literal>",
        "Returns <literal>0</literal> if no channel matching "
        "<replaceable>channelname</replaceable> exists, <literal>1</literal> otherwise.",
        "Example return code: 200 result=1 (The time is 1578493800)",
    ),
    "EXEC": _usage(
        "Executes <replaceable>application</replaceable> with given "
        "<replaceable>options</replaceable>.",
        "Returns whatever the <replaceable>application</replaceable> returns, or "
        "<literal>-2</literal> on failure to find <replaceable>application</replaceable>.",
        "<note>NOTE:</note> exec does not evaluate dialplan functions and variables unless it "
        "is explicitly enabled by setting the <variable>AGIEXECFULL</variable> variable to "
        "<literal>yes</literal>.",
    ),
    "SET CONTEXT": _usage("Sets the context for continuation upon exiting the application."),
    "SET EXTENSION": _usage("Changes the extension for continuation upon exiting the application."),
    "SET PRIORITY": _usage(
        "Changes the priority for continuation upon exiting the application. The priority "
        "must be a valid priority or label."
    ),
    "SET MUSIC": _usage(
        "Enables/Disables the music on hold generator. If <replaceable>class</replaceable> is "
        "not specified, then the <literal>default</literal> music on hold class will be used. "
        "This generator will be stopped automatically when playing a file.",
        "Always returns <literal>0</literal>.",
    ),
    "VERBOSE": _usage(
        "Sends <replaceable>message</replaceable> to the console via verbose message system. "
        "<replaceable>level</replaceable> is the verbose level (1-4). Always returns "
        "<literal>1</literal>"
    ),
}
