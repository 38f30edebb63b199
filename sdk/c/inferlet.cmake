# inferlet.cmake — builds C inferlets to wasm32-wasi command modules at build
# time, with the same flags as `pie build` (cli/cmd_build.c):
#   pie_add_inferlet(NAME OUTPUT out.wasm SOURCES a.c ...)
# Sets PIE_WASM_OK to FALSE (and builds nothing) when clang, wasm-ld or
# wasi-libc are missing.
if(DEFINED PIE_WASM_OK)
  return()
endif()
find_program(PIE_WASM_CLANG NAMES clang clang-14)
find_program(PIE_WASM_LD NAMES wasm-ld wasm-ld-14)
set(PIE_WASI_SYSROOT_INC /usr/include/wasm32-wasi)
set(PIE_WASI_SYSROOT_LIB /usr/lib/wasm32-wasi)
if(PIE_WASM_CLANG AND PIE_WASM_LD AND EXISTS ${PIE_WASI_SYSROOT_INC}/stdio.h
   AND EXISTS ${PIE_WASI_SYSROOT_LIB}/libc.a)
  set(PIE_WASM_OK TRUE)
else()
  set(PIE_WASM_OK FALSE)
  message(STATUS "pie: clang/wasm-ld/wasi-libc not found: inferlets are not "
                 "built (apt install clang lld wasi-libc libclang-rt-14-dev-wasm32)")
endif()
set(PIE_SDK_DIR ${CMAKE_SOURCE_DIR}/sdk/c)
file(GLOB PIE_SDK_SRC CONFIGURE_DEPENDS ${PIE_SDK_DIR}/*.c)
set(PIE_WASM_FLAGS --target=wasm32-wasi -O2 -nostdlibinc
    -isystem ${PIE_WASI_SYSROOT_INC} -I${PIE_SDK_DIR}
    -Wall -Wextra -Werror -Wno-unused-parameter -Wno-sign-compare
    -mno-simd128 -Wl,--stack-first -Wl,-z,stack-size=131072 -Wl,--strip-all)

function(pie_add_inferlet name)
  cmake_parse_arguments(A "" "OUTPUT" "SOURCES" ${ARGN})
  if(NOT PIE_WASM_OK)
    return()
  endif()
  add_custom_command(OUTPUT ${A_OUTPUT}
    COMMAND ${PIE_WASM_CLANG} ${PIE_WASM_FLAGS} -o ${A_OUTPUT} ${A_SOURCES}
            ${PIE_SDK_SRC}
    DEPENDS ${A_SOURCES} ${PIE_SDK_SRC} ${PIE_SDK_DIR}/pie.h
            ${PIE_SDK_DIR}/pie_api.h
    COMMENT "inferlet ${name} -> wasm"
    VERBATIM)
  add_custom_target(inferlet_${name} ALL DEPENDS ${A_OUTPUT})
endfunction()
