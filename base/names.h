/* The names of statuses and methods, one table each for every room that prints or parses
 * them: the engine, the server's log and metrics, libfasa and the CLI. The numbers are the
 * wire's (proto/fasa.proto): Status as is; methods in the engine's numbering (fasa_method,
 * coord/engine.h), which is the wire's Method less one (the wire's 0 is DEFAULT). */
#ifndef FASA_BASE_NAMES_H
#define FASA_BASE_NAMES_H

/* Every name returned below is a static string: borrowed, never freed. */

/* "OK", "INVALID_ARGUMENT", ... "UNAVAILABLE"; "UNKNOWN" out of range. */
const char *fasa_names_status(int code);
/* "fasa", "dense", "oracle", "stream", "quest", "sparq", "fasa-plus"; "unknown" out of range. */
const char *fasa_names_method(int method);
/* The wire's Method: "default" for 0, else fasa_names_method(method - 1). */
const char *fasa_names_wire_method(int wire_method);
/* The method named name (engine numbering), or -1. */
int fasa_names_method_parse(const char *name);
/* Methods in the engine's numbering: 0 .. FASA_NAMES_N_METHODS - 1. */
#define FASA_NAMES_N_METHODS 7

#endif
